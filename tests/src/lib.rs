//! The end-to-end test harness.
//!
//! - [`build`]: builds the `sluice` binary, the example scripts and the
//!   hostile guests once per test process, so no prebuilt artifact is assumed;
//! - [`cli`]: runs the `sluice` binary and captures what it prints.

pub mod build;
pub mod cli;
