//! The bus between processing and the gateways of every instance, and the
//! shared state behind it. Two implementations of one trait: [`MemoryBus`]
//! (the embedded default, one process) and [`RedisBus`] (several instances).

pub mod history;
mod interest;
mod memory;
mod publication;
mod redis;

use async_trait::async_trait;

/// The longest pause between two attempts to reach the bus again: after
/// an outage, every loop that lost it is back within this of its return.
pub const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(1);

pub use interest::Interest;
pub use memory::MemoryBus;
pub use publication::{
    AlertRaised, EventReported, GROUP_PATTERN, Publication, StatusChange, TelemetryReport,
    alert_channel, event_channel, json_text, status_channel, telemetry_channel,
};
pub use redis::check_url as check_redis_url;
pub use redis::{
    Followed, GROUP_WATCH_PREFIX, INTEREST_CHANNEL, Reconnect, RedisBus, RedisTarget,
    TransitionFeed, mirror_interest,
};

use crate::deadletter::DeadLetter;
use crate::latest::{Delta, Snapshot};
use crate::status::{DeviceStatus, StatusSource};
use history::{Position, RangeQuery, Recorded, Recovery};

/// The bus could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    /// The shared store is unreachable or refused the command.
    #[error("the bus is unavailable: {0}")]
    Unavailable(String),
    /// What came back from the store does not parse.
    #[error("the bus returned bad data: {0}")]
    Corrupt(String),
}

/// A deadline shared between instances: the device goes offline at
/// `at_ms` unless a message refreshes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deadline {
    /// The device.
    pub device: String,
    /// When it expires, ms since the Unix epoch.
    pub at_ms: i64,
    /// The source its expiry will carry (`heartbeat_expired` or `timeout_expired`).
    pub source: StatusSource,
}

/// Fan-out and shared state. Every method is called from async tasks that
/// batch work; none is called per message.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// `memory` or `redis`.
    fn kind(&self) -> &'static str;

    /// Whether deadlines are kept in the bus and swept there (several
    /// instances), instead of by each instance's own timers.
    fn shares_deadlines(&self) -> bool;

    /// Changes when the bus moves to another node (a Redis failover):
    /// whoever waits to try the bus again can try at once.
    fn moves(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// Checks that the bus answers.
    async fn ping(&self) -> Result<(), BusError>;

    /// Delivers publications (already filtered by interest) to every
    /// instance's gateways.
    async fn publish(&self, batch: &[Publication]) -> Result<(), BusError>;

    /// Delivers publications of members to the watchers of a group (its
    /// channel of their kind, `ws:group:{group}` for telemetry), each
    /// `(group, publication)` once: the group is watched as a whole.
    async fn publish_groups(&self, batch: &[(String, Publication)]) -> Result<(), BusError>;

    /// Records status changes in the shared status table; a change takes
    /// effect only if the table does not already hold that status, so
    /// across instances each transition happens once. Changes that take
    /// effect go to their tenant's history, and those `watched` are
    /// published, carrying their position, as is each to the channel of
    /// every group of its device's `groups` that is watched, in the same
    /// step. Returns, in order, the position of each that took effect
    /// (`None` for the others).
    async fn record_transitions(
        &self,
        batch: &[StatusChange],
        watched: &[bool],
        groups: &[Vec<String>],
    ) -> Result<Vec<Option<Position>>, BusError>;

    /// The shared status table, to start from after a restart.
    async fn load_status(&self) -> Result<Vec<(String, DeviceStatus)>, BusError>;

    /// One device's entry in the shared status table (`None` with the
    /// in-process bus, whose table is this process's own).
    async fn load_device_status(&self, device: &str) -> Result<Option<DeviceStatus>, BusError>;

    /// The entries of many devices in the shared status table, in the
    /// order asked, pipelined.
    async fn load_status_many(
        &self,
        devices: &[String],
    ) -> Result<Vec<Option<DeviceStatus>>, BusError>;

    /// Writes latest-value changes behind.
    async fn store_latest(&self, batch: &[(String, Delta)]) -> Result<(), BusError>;

    /// The latest values of a device as any instance last wrote them.
    async fn load_latest(&self, device: &str) -> Result<Option<Snapshot>, BusError>;

    /// The latest values of many devices, in the order asked, pipelined.
    async fn load_latest_many(&self, devices: &[String])
    -> Result<Vec<Option<Snapshot>>, BusError>;

    /// Writes shared deadlines behind.
    async fn store_deadlines(&self, batch: &[Deadline]) -> Result<(), BusError>;

    /// Takes up to `limit` deadlines due by `cutoff_ms` and, in the same
    /// atomic step, records the offline transition (at `now_ms`) of each
    /// device that was online; each is taken by exactly one caller across
    /// all instances. Returns the transitions recorded, with their positions.
    async fn sweep_deadlines(
        &self,
        cutoff_ms: i64,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<StatusChange>, BusError>;

    /// Keeps dead letters.
    async fn add_dead_letters(&self, batch: &[DeadLetter]) -> Result<(), BusError>;

    /// The newest `limit` dead letters (of devices of `tenant` only, when
    /// given), newest first.
    async fn dead_letters(
        &self,
        limit: usize,
        tenant: Option<&str>,
    ) -> Result<Vec<DeadLetter>, BusError>;

    /// Records alerts and events in their tenants' history, and publishes
    /// each whose device is `watched`, carrying its position, and each to
    /// the channel of every watched group of its device's `groups`, in the
    /// same step. `ids` are
    /// this writer's, increasing: an entry whose id its tenant's history
    /// already took from this writer (written again after a lost answer,
    /// or a failover after replication) is not recorded twice. Returns, in
    /// order, the position each was recorded at now (`None` for one that
    /// could not be written, or was recorded before).
    async fn record(
        &self,
        batch: &[Publication],
        watched: &[bool],
        groups: &[Vec<String>],
        ids: &[u64],
    ) -> Result<Vec<Option<Position>>, BusError>;

    /// Appends `publication` (a command's state change) to its tenant's
    /// history, publishing nothing; returns its position.
    async fn record_history(&self, publication: &Publication) -> Result<Position, BusError>;

    /// The newest position of each of `tenants`' histories, in order.
    async fn history_tops(&self, tenants: &[String]) -> Result<Vec<Position>, BusError>;

    /// What came after `since` in its tenant's history; more than `limit`
    /// entries is not recovered.
    async fn history_after(&self, since: &Position, limit: usize) -> Result<Recovery, BusError>;

    /// The entries `query` asks for, oldest first.
    async fn history_range(&self, query: &RangeQuery) -> Result<Vec<Recorded>, BusError>;

    /// Appends processed records (JSON) to the records stream, if the bus keeps one.
    async fn add_records(&self, batch: &[String]) -> Result<(), BusError>;
}
