//! Online/offline status: the modes, a tracker sized for a million
//! devices, and the board that shards it.

mod board;
mod mode;
mod tracker;

pub use board::StatusBoard;
pub use mode::{StatusMode, StatusSource};
pub use tracker::{DeviceStatus, StatusTracker, Transition};
