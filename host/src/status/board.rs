//! The status of every device: one tracker per shard.

use std::time::Duration;

use tokio::time::Instant;

use super::mode::{StatusMode, StatusSource};
use super::tracker::{DeviceStatus, StatusTracker, Transition};
use crate::pipeline::Sharded;

/// Status of all devices, sharded like the workers.
#[derive(Debug)]
pub struct StatusBoard {
    trackers: Sharded<StatusTracker>,
}

impl StatusBoard {
    /// `shards` empty trackers with deadlines precise to `tick`.
    pub fn new(shards: usize, tick: Duration) -> Self {
        let origin = Instant::now();
        let origin_wall = crate::message::now_ms();
        StatusBoard {
            trackers: Sharded::new(shards, || StatusTracker::new(origin, origin_wall, tick)),
        }
    }

    /// See [`StatusTracker::observe`].
    pub fn observe(
        &self,
        device: &str,
        mode: StatusMode,
        signal: Option<bool>,
        now: Instant,
        wall_ms: i64,
    ) -> Option<Transition> {
        self.trackers
            .for_device(device)
            .observe(device, mode, signal, now, wall_ms)
    }

    /// The status of `device`.
    pub fn get(&self, device: &str) -> Option<DeviceStatus> {
        self.trackers.for_device(device).get(device)
    }

    /// See [`StatusTracker::restore`].
    pub fn restore(&self, device: &str, status: DeviceStatus, mode: StatusMode, now: Instant) {
        self.trackers
            .for_device(device)
            .restore(device, status, mode, now);
    }

    /// See [`StatusTracker::follow`].
    pub fn follow(
        &self,
        device: &str,
        online: bool,
        since_ms: i64,
        source: StatusSource,
        deadline_ms: Option<i64>,
        wall_ms: i64,
    ) -> Option<Transition> {
        self.trackers.for_device(device).follow(
            device,
            online,
            since_ms,
            source,
            deadline_ms,
            wall_ms,
        )
    }

    /// Expires every shard.
    pub fn expire(&self, now: Instant, wall_ms: i64) -> Vec<Transition> {
        self.trackers
            .each()
            .flat_map(|mut t| t.expire(now, wall_ms))
            .collect()
    }

    /// How many devices have a status record.
    pub fn len(&self) -> usize {
        self.trackers.each().map(|t| t.len()).sum()
    }

    /// Whether none has.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every known device with its status (a copy, shard by shard).
    pub fn all(&self) -> Vec<(String, DeviceStatus)> {
        self.trackers
            .each()
            .flat_map(|t| t.all().map(|(d, s)| (d.to_owned(), s)).collect::<Vec<_>>())
            .collect()
    }
}
