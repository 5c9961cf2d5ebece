//! sluice: a WebAssembly-extensible stream processor for IoT device data.
//!
//! A message follows the modules in order:
//!
//! - [`source`]: MQTT, Kafka and HTTP ingest (and the demo's device
//!   simulator) turn bytes into a [`message::RawMessage`] (or a status
//!   signal);
//! - [`route`]: topic templates name the product and device;
//! - [`pipeline`]: envelopes are sharded by device to script workers,
//!   whose effects reach the bus in batches; timers expire deadlines;
//! - [`script`]: the sandboxed engine runs the product's data script
//!   (compile, cache, core modules wrapped into components, limits,
//!   instances, the packed encoding of messages and outputs, fixtures, hot
//!   reload); [`authoring`] builds, creates and benchmarks scripts;
//! - [`status`]: status modes and a tracker sized for a million devices;
//! - [`latest`]: each device's last values;
//! - [`bus`]: publication to watched devices only, in-process or through
//!   Redis, and the shared state behind it;
//! - [`deadletter`] and [`records`]: what failed, and what succeeded, kept
//!   for later;
//! - [`commands`]: the way back: commands encoded by the product's script,
//!   sent as downlinks, and followed to the device's reply;
//! - [`gateway`]: the HTTP API, the WebSockets and the dashboard (axum);
//! - [`config`], [`devices`], [`metrics`], [`server`] and [`cli`]: setting
//!   up, wiring together and running it; [`supervisor`] restarts a
//!   long-lived task that panics.

pub mod authoring;
pub mod bus;
pub mod cli;
pub mod commands;
pub mod config;
pub mod deadletter;
pub mod devices;
pub mod gateway;
pub mod latest;
pub mod message;
pub mod metrics;
pub mod pipeline;
pub mod records;
pub mod route;
pub mod script;
pub mod server;
pub mod source;
pub mod status;
pub mod supervisor;
