//! The in-process bus: one sluice process, no Redis. Publications go to
//! subscribers in the same process; state lives in the process.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::history::{HistoryLimits, HistoryRing, Position, RangeQuery, Recorded, Recovery};
use super::{Bus, BusError, Deadline, Publication, StatusChange};
use crate::deadletter::{DeadLetter, DeadLetterRing};
use crate::latest::{Delta, Snapshot};
use crate::message::now_ms;
use crate::status::DeviceStatus;

/// How many publications an in-process subscriber may lag behind before it
/// misses some (it is told how many).
const SUBSCRIBER_BACKLOG: usize = 4096;

/// The embedded bus.
#[derive(Debug)]
pub struct MemoryBus {
    publications: broadcast::Sender<Arc<Publication>>,
    /// Reports of members of watched groups, with the group.
    groups: broadcast::Sender<Arc<(String, Publication)>>,
    dead_letters: DeadLetterRing,
    history: HistoryRing,
}

impl MemoryBus {
    /// A bus keeping up to `dead_letters` dead letters, and history
    /// within `history`.
    pub fn new(dead_letters: usize, history: HistoryLimits) -> Self {
        MemoryBus {
            publications: broadcast::channel(SUBSCRIBER_BACKLOG).0,
            groups: broadcast::channel(SUBSCRIBER_BACKLOG).0,
            dead_letters: DeadLetterRing::new(dead_letters),
            history: HistoryRing::new(history),
        }
    }

    /// Appends each publication to its tenant's history; publishes those
    /// `watched`, and each to its device's groups (the hub takes the
    /// watched ones), carrying their positions; returns the positions.
    fn record_and_publish<'a>(
        &self,
        batch: impl Iterator<Item = (&'a Publication, bool)>,
        groups: &[Vec<String>],
    ) -> Vec<Option<Position>> {
        let now = now_ms();
        batch
            .enumerate()
            .map(|(i, (publication, watched))| {
                let position = self.history.append(publication.tenant(), publication, now);
                let recorded = publication.clone().at(position.clone());
                // No subscriber is not an error: nobody is watching here.
                for group in groups.get(i).into_iter().flatten() {
                    let _ = self
                        .groups
                        .send(Arc::new((group.clone(), recorded.clone())));
                }
                if watched {
                    let _ = self.publications.send(Arc::new(recorded));
                }
                Some(position)
            })
            .collect()
    }

    /// Receives every publication from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Publication>> {
        self.publications.subscribe()
    }

    /// Receives every report published to a watched group from now on.
    pub fn subscribe_groups(&self) -> broadcast::Receiver<Arc<(String, Publication)>> {
        self.groups.subscribe()
    }
}

#[async_trait]
impl Bus for MemoryBus {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn shares_deadlines(&self) -> bool {
        false
    }

    async fn ping(&self) -> Result<(), BusError> {
        Ok(())
    }

    async fn publish(&self, batch: &[Publication]) -> Result<(), BusError> {
        for publication in batch {
            // No subscriber is not an error: nobody is watching here.
            let _ = self.publications.send(Arc::new(publication.clone()));
        }
        Ok(())
    }

    async fn record_transitions(
        &self,
        batch: &[StatusChange],
        watched: &[bool],
        groups: &[Vec<String>],
    ) -> Result<Vec<Option<Position>>, BusError> {
        // One process: the local trackers already emit each transition once.
        let changes: Vec<Publication> = batch
            .iter()
            .map(|change| Publication::Status(change.clone()))
            .collect();
        Ok(self.record_and_publish(changes.iter().zip(watched.iter().copied()), groups))
    }

    async fn load_status(&self) -> Result<Vec<(String, DeviceStatus)>, BusError> {
        Ok(Vec::new())
    }

    async fn store_latest(&self, _batch: &[(String, Delta)]) -> Result<(), BusError> {
        Ok(())
    }

    async fn load_device_status(&self, _device: &str) -> Result<Option<DeviceStatus>, BusError> {
        Ok(None)
    }

    async fn load_latest(&self, _device: &str) -> Result<Option<Snapshot>, BusError> {
        Ok(None)
    }

    async fn load_latest_many(
        &self,
        devices: &[String],
    ) -> Result<Vec<Option<Snapshot>>, BusError> {
        Ok(vec![None; devices.len()])
    }

    async fn load_status_many(
        &self,
        devices: &[String],
    ) -> Result<Vec<Option<DeviceStatus>>, BusError> {
        Ok(vec![None; devices.len()])
    }

    async fn store_deadlines(&self, _batch: &[Deadline]) -> Result<(), BusError> {
        Ok(())
    }

    async fn sweep_deadlines(
        &self,
        _cutoff_ms: i64,
        _now_ms: i64,
        _limit: usize,
    ) -> Result<Vec<StatusChange>, BusError> {
        Ok(Vec::new())
    }

    async fn add_dead_letters(&self, batch: &[DeadLetter]) -> Result<(), BusError> {
        self.dead_letters.push(batch.iter().cloned());
        Ok(())
    }

    async fn dead_letters(
        &self,
        limit: usize,
        tenant: Option<&str>,
    ) -> Result<Vec<DeadLetter>, BusError> {
        Ok(self.dead_letters.newest(limit, tenant))
    }

    async fn publish_groups(&self, batch: &[(String, Publication)]) -> Result<(), BusError> {
        for delivery in batch {
            // No subscriber is not an error: nobody is watching here.
            let _ = self.groups.send(Arc::new(delivery.clone()));
        }
        Ok(())
    }

    async fn record(
        &self,
        batch: &[Publication],
        watched: &[bool],
        groups: &[Vec<String>],
        // One process: nothing it records is lost in between, or retried.
        _ids: &[u64],
    ) -> Result<Vec<Option<Position>>, BusError> {
        Ok(self.record_and_publish(batch.iter().zip(watched.iter().copied()), groups))
    }

    async fn record_history(&self, publication: &Publication) -> Result<Position, BusError> {
        Ok(self
            .history
            .append(publication.tenant(), publication, now_ms()))
    }

    async fn history_tops(&self, tenants: &[String]) -> Result<Vec<Position>, BusError> {
        Ok(tenants.iter().map(|t| self.history.top(t)).collect())
    }

    async fn history_after(&self, since: &Position, limit: usize) -> Result<Recovery, BusError> {
        Ok(self.history.after(since, limit, now_ms()))
    }

    async fn history_range(&self, query: &RangeQuery) -> Result<Vec<Recorded>, BusError> {
        Ok(self.history.range(query, now_ms()))
    }

    async fn add_records(&self, _batch: &[String]) -> Result<(), BusError> {
        Ok(())
    }
}
