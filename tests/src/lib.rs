//! The end-to-end test harness.
//!
//! - [`browser`]: headless Chromium through ChromeDriver, for the dashboard;
//! - [`build`]: builds the `sluice` binary, the example scripts and the
//!   hostile guests once per test process, so no prebuilt artifact is assumed;
//! - [`cli`]: runs the `sluice` binary and captures what it prints;
//! - [`mqtt`]: a device-like MQTT publisher;
//! - [`servers`]: real `redis-server` and `mosquitto` on ephemeral ports;
//! - [`sluice`]: sluice itself in the test process, with example scripts;
//! - [`ws`]: a real WebSocket client.

pub mod browser;
pub mod build;
pub mod cli;
pub mod mqtt;
pub mod servers;
pub mod sluice;
pub mod ws;
