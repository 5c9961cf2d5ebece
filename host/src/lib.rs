//! sluice: a WebAssembly-extensible stream processor for IoT device data.
//!
//! Devices send raw payloads; each product's data script (a WebAssembly
//! component) turns them into telemetry, attributes, events, alerts and
//! status signals. The crate follows the data:
//!
//! - [`message`]: the raw message as it arrived;
//! - [`script`]: the script engine (compile, cache, link, sandbox, limits),
//!   script instances, outputs and fixtures;
//! - [`cli`]: the `sluice` command line.

pub mod cli;
pub mod message;
pub mod script;
