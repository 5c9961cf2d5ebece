//! Effects: what workers hand to the bus (publications, status changes,
//! dead letters, records), applied in batches by one task so no message
//! waits on a network round trip.
//!
//! A message is acknowledged at its source (MQTT PUBACK, Kafka commit)
//! only once the effects it caused were accepted by the bus: workers send
//! each batch's effects, then its [`Effect::Acknowledge`], and this task
//! completes those acknowledgements only after everything before them was
//! applied. When the bus is down, telemetry publications are dropped (they
//! are live data), and status changes, alerts and events (kept in
//! history), dead letters and records wait, up to a
//! bounded backlog; when that is full, this task stops taking effects, so
//! the workers and then the sources wait (backpressure) and nothing
//! accepted is dropped.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, mpsc};
use tokio::time::Instant;

use super::envelope::Completion;
use crate::bus::{Bus, BusError, Publication, RETRY_MAX, StatusChange};
use crate::commands::Commands;
use crate::deadletter::DeadLetter;
use crate::records::RecordsOutput;

/// One thing for the bus to do.
#[derive(Debug)]
pub enum Effect {
    /// Publish telemetry to the device's channel (already filtered by
    /// interest).
    Publish(Publication),
    /// Publish telemetry of a member of a watched group to the group's
    /// channel.
    GroupPublish {
        /// The group.
        group: String,
        /// The report.
        publication: Publication,
    },
    /// Record an alert or event in its tenant's history; publish it if
    /// watched, and to the channel of each watched group of its device.
    Discrete {
        /// The alert or event.
        publication: Publication,
        /// Whether anyone watches the device.
        watched: bool,
        /// The device's groups.
        groups: Vec<String>,
    },
    /// Record a status change; publish it if watched, and to the channel
    /// of each watched group of its device.
    Transition {
        /// The change.
        change: StatusChange,
        /// Whether anyone watches the device.
        watched: bool,
        /// The device's groups.
        groups: Vec<String>,
    },
    /// Keep a dead letter.
    DeadLetter(DeadLetter),
    /// Append a processed record (JSON).
    Record(String),
    /// A device answered a command.
    Reply(Reply),
    /// A device reported (or came online) while it has queued commands:
    /// send them.
    DeliverQueued(String),
    /// The messages whose effects came before are finished: acknowledge
    /// them at their sources once those effects are applied.
    Acknowledge(Vec<Completion>),
}

/// A device's answer to a command, from a script's `reply` output.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The device that answered.
    pub device_id: String,
    /// The command it answered.
    pub command_id: String,
    /// Whether it did what was asked.
    pub ok: bool,
    /// Why not.
    pub error: String,
    /// Its values.
    pub fields: crate::script::Fields,
}

/// Effects taken per batch, at most.
const BATCH: usize = 1024;
/// Status changes, dead letters and records that may wait for the bus
/// while it is down; beyond it, intake waits.
pub const BACKLOG: usize = 100_000;
/// The first wait before trying a failed bus again; it doubles up to 5 s.
const FIRST_RETRY: Duration = Duration::from_millis(100);

/// The queue from workers to the effects task, shared so a restarted task
/// (after a panic) takes it up again.
pub type EffectsQueue = Arc<Mutex<mpsc::Receiver<Effect>>>;

/// Applies effects until every sender is gone, then drains what is left
/// (once: a bus that is down at the end leaves those messages
/// unacknowledged, so their sources deliver them again).
pub async fn apply_effects(
    queue: EffectsQueue,
    bus: Arc<dyn Bus>,
    records: Option<Arc<RecordsOutput>>,
    commands: Arc<Commands>,
) {
    // Held for the life of the task; a panic releases it for the next one.
    let mut effects = queue.lock().await;
    let mut pending = Pending::default();
    let mut backoff = FIRST_RETRY;
    let mut retry_at: Option<Instant> = None;
    let mut moves = bus.moves();
    let mut received = Vec::with_capacity(BATCH);
    let mut closed = false;
    loop {
        let room = BACKLOG.saturating_sub(pending.held());
        if !closed && room > 0 {
            let limit = room.min(BATCH);
            let count = match retry_at {
                Some(at) => tokio::select! {
                    n = effects.recv_many(&mut received, limit) => Some(n),
                    moved = retry_wait(at, &mut moves) => {
                        if moved {
                            // The bus moved to another node: try it now.
                            (retry_at, backoff) = (Some(Instant::now()), FIRST_RETRY);
                        }
                        None
                    }
                },
                None => Some(effects.recv_many(&mut received, limit).await),
            };
            closed = count == Some(0);
            pending.add(received.drain(..));
        } else if let Some(at) = retry_at {
            if room == 0 && !closed {
                metrics::counter!("sluice_effects_backpressure_total").increment(1);
            }
            if retry_wait(at, &mut moves).await {
                (retry_at, backoff) = (Some(Instant::now()), FIRST_RETRY);
            }
        }
        if retry_at.is_some_and(|at| Instant::now() < at) && !closed {
            // Live data cannot wait for the bus.
            pending.drop_publications();
            continue;
        }
        match pending.apply(&*bus, records.as_deref(), &commands).await {
            Ok(()) => {
                if retry_at.take().is_some() {
                    tracing::info!(
                        bus = bus.kind(),
                        "bus reachable again; held effects delivered"
                    );
                }
                backoff = FIRST_RETRY;
                pending.acknowledge();
            }
            Err(error) => {
                if retry_at.is_none() {
                    tracing::warn!(bus = bus.kind(), %error, "bus unavailable; dropping live publications, holding status changes, dead letters, records and acknowledgements");
                }
                metrics::counter!("sluice_bus_errors_total", "op" => "apply").increment(1);
                pending.drop_publications();
                retry_at = Some(Instant::now() + backoff);
                backoff = (backoff * 2).min(RETRY_MAX);
                if closed {
                    tracing::warn!(
                        waiting = pending.held(),
                        unacknowledged = pending.acks.len(),
                        "stopping with effects the bus did not take; their messages stay unacknowledged"
                    );
                    return;
                }
            }
        }
        if closed {
            return;
        }
    }
}

/// Until `at` (false), or until the bus moves to another node (true).
async fn retry_wait(at: Instant, moves: &mut Option<tokio::sync::watch::Receiver<u64>>) -> bool {
    let moved = async {
        let Some(moves) = moves else {
            return std::future::pending().await;
        };
        if moves.changed().await.is_err() {
            // The bus is gone: it will not move again.
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = tokio::time::sleep_until(at) => false,
        () = moved => true,
    }
}

/// The copies of `publication` for the channels of `groups`.
pub(super) fn group_copies(
    publication: Publication,
    groups: Vec<String>,
) -> impl Iterator<Item = (String, Publication)> {
    groups
        .into_iter()
        .map(move |group| (group, publication.clone()))
}

/// The `kind` label of a group channel's publication.
fn group_kind(publication: &Publication) -> &'static str {
    match publication {
        Publication::Telemetry(_) => "group_telemetry",
        Publication::Status(_) => "group_status",
        Publication::Alert(_) => "group_alert",
        Publication::Event(_) => "group_event",
        Publication::Command(_) => "group_command",
    }
}

/// The record ids of alerts and events: increasing for the life of the
/// process (an effects task started again after a panic goes on from
/// where the last one was), which is one writer to the history.
static RECORD_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[derive(Default)]
struct Pending {
    publications: Vec<Publication>,
    group_publications: Vec<(String, Publication)>,
    /// Alerts and events with their record ids (increasing: an entry
    /// written again after a lost answer is recorded once).
    discrete: Vec<(u64, Publication, bool, Vec<String>)>,
    transitions: Vec<(StatusChange, bool, Vec<String>)>,
    dead_letters: Vec<DeadLetter>,
    records: Vec<String>,
    replies: Vec<Reply>,
    deliveries: Vec<String>,
    acks: Vec<Completion>,
}

impl Pending {
    fn add(&mut self, effects: impl Iterator<Item = Effect>) {
        for effect in effects {
            match effect {
                Effect::Publish(p) => self.publications.push(p),
                Effect::GroupPublish { group, publication } => {
                    self.group_publications.push((group, publication));
                }
                Effect::Discrete {
                    publication,
                    watched,
                    groups,
                } => {
                    let id = RECORD_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    self.discrete.push((id, publication, watched, groups));
                }
                Effect::Transition {
                    change,
                    watched,
                    groups,
                } => self.transitions.push((change, watched, groups)),
                Effect::DeadLetter(letter) => {
                    metrics::counter!("sluice_deadletters_total", "reason" => letter.reason.as_str()).increment(1);
                    self.dead_letters.push(letter);
                }
                Effect::Record(record) => self.records.push(record),
                Effect::Reply(reply) => self.replies.push(reply),
                Effect::DeliverQueued(device) => {
                    if !self.deliveries.contains(&device) {
                        self.deliveries.push(device);
                    }
                }
                Effect::Acknowledge(done) => self.acks.extend(done),
            }
        }
    }

    /// What must not be lost while the bus is down.
    fn held(&self) -> usize {
        self.transitions.len()
            + self.discrete.len()
            + self.dead_letters.len()
            + self.records.len()
            + self.replies.len()
            + self.deliveries.len()
    }

    fn drop_publications(&mut self) {
        let dropped = self.publications.len() + self.group_publications.len();
        if dropped > 0 {
            metrics::counter!("sluice_publish_dropped_total").increment(dropped as u64);
            self.publications.clear();
            self.group_publications.clear();
        }
    }

    /// Completes the acknowledgements of everything applied, in order.
    fn acknowledge(&mut self) {
        for done in self.acks.drain(..) {
            done.complete();
        }
    }

    /// Applies everything; what failed stays pending.
    async fn apply(
        &mut self,
        bus: &dyn Bus,
        records: Option<&RecordsOutput>,
        commands: &Commands,
    ) -> Result<(), BusError> {
        if !self.publications.is_empty() {
            bus.publish(&self.publications).await?;
            for publication in &self.publications {
                metrics::counter!("sluice_publishes_total", "kind" => publication.kind())
                    .increment(1);
            }
            self.publications.clear();
        }
        if !self.group_publications.is_empty() {
            bus.publish_groups(&self.group_publications).await?;
            for (_, publication) in &self.group_publications {
                metrics::counter!("sluice_publishes_total", "kind" => group_kind(publication))
                    .increment(1);
            }
            self.group_publications.clear();
        }
        if !self.discrete.is_empty() {
            let ids: Vec<u64> = self.discrete.iter().map(|(id, ..)| *id).collect();
            let (batch, watched): (Vec<Publication>, Vec<bool>) = self
                .discrete
                .iter()
                .map(|(_, p, w, _)| (p.clone(), *w))
                .unzip();
            let groups: Vec<Vec<String>> = self.discrete.iter().map(|d| d.3.clone()).collect();
            bus.record(&batch, &watched, &groups, &ids).await?;
            for (_, publication, watched, _) in self.discrete.drain(..) {
                metrics::counter!("sluice_history_entries_total", "kind" => publication.kind())
                    .increment(1);
                if watched {
                    metrics::counter!("sluice_publishes_total", "kind" => publication.kind())
                        .increment(1);
                }
            }
        }
        if !self.transitions.is_empty() {
            let (changes, watched): (Vec<StatusChange>, Vec<bool>) = self
                .transitions
                .iter()
                .map(|(c, w, _)| (c.clone(), *w))
                .unzip();
            let groups: Vec<Vec<String>> = self.transitions.iter().map(|t| t.2.clone()).collect();
            let applied = bus.record_transitions(&changes, &watched, &groups).await?;
            for ((change, watched, _), applied) in self.transitions.drain(..).zip(applied) {
                if applied.is_none() {
                    continue;
                }
                metrics::counter!("sluice_status_transitions_total", "source" => change.source.as_str()).increment(1);
                if watched {
                    metrics::counter!("sluice_publishes_total", "kind" => "status").increment(1);
                }
            }
        }
        if !self.dead_letters.is_empty() {
            bus.add_dead_letters(&self.dead_letters).await?;
            self.dead_letters.clear();
        }
        if let Some(output) = records
            && !self.records.is_empty()
        {
            output.write(bus, &self.records).await?;
            metrics::counter!("sluice_records_total").increment(self.records.len() as u64);
            self.records.clear();
        }
        // Completing a command twice (after a retry) changes nothing.
        for reply in &self.replies {
            commands.complete(reply).await.map_err(command_error)?;
        }
        self.replies.clear();
        for device in &self.deliveries {
            commands
                .deliver_queued(device)
                .await
                .map_err(command_error)?;
        }
        self.deliveries.clear();
        Ok(())
    }
}

/// A failure of the command store, as the bus failure it is.
fn command_error(error: crate::commands::CommandError) -> BusError {
    BusError::Unavailable(error.to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::bus::history::{HistoryLimits, Position, RangeQuery, Recorded, Recovery};
    use crate::bus::{Deadline, MemoryBus};
    use crate::latest::{Delta, Snapshot};
    use crate::message::SourceKind;
    use crate::status::DeviceStatus;

    /// The in-process bus, with a switch that makes it unavailable.
    struct Switchable {
        inner: MemoryBus,
        down: AtomicBool,
        letters: AtomicUsize,
    }

    impl Switchable {
        fn check(&self) -> Result<(), BusError> {
            if self.down.load(Ordering::SeqCst) {
                Err(BusError::Unavailable("switched off".into()))
            } else {
                Ok(())
            }
        }
    }

    #[async_trait]
    impl Bus for Switchable {
        fn kind(&self) -> &'static str {
            "switchable"
        }
        fn shares_deadlines(&self) -> bool {
            false
        }
        async fn ping(&self) -> Result<(), BusError> {
            self.check()
        }
        async fn publish(&self, batch: &[Publication]) -> Result<(), BusError> {
            self.check()?;
            self.inner.publish(batch).await
        }
        async fn record_transitions(
            &self,
            batch: &[StatusChange],
            watched: &[bool],
            groups: &[Vec<String>],
        ) -> Result<Vec<Option<Position>>, BusError> {
            self.check()?;
            self.inner.record_transitions(batch, watched, groups).await
        }
        async fn load_status(&self) -> Result<Vec<(String, DeviceStatus)>, BusError> {
            Ok(Vec::new())
        }
        async fn load_device_status(&self, _: &str) -> Result<Option<DeviceStatus>, BusError> {
            Ok(None)
        }
        async fn load_status_many(
            &self,
            devices: &[String],
        ) -> Result<Vec<Option<DeviceStatus>>, BusError> {
            Ok(vec![None; devices.len()])
        }
        async fn store_latest(&self, _: &[(String, Delta)]) -> Result<(), BusError> {
            Ok(())
        }
        async fn load_latest(&self, _: &str) -> Result<Option<Snapshot>, BusError> {
            Ok(None)
        }
        async fn load_latest_many(
            &self,
            devices: &[String],
        ) -> Result<Vec<Option<Snapshot>>, BusError> {
            Ok(vec![None; devices.len()])
        }
        async fn store_deadlines(&self, _: &[Deadline]) -> Result<(), BusError> {
            Ok(())
        }
        async fn sweep_deadlines(
            &self,
            _: i64,
            _: i64,
            _: usize,
        ) -> Result<Vec<StatusChange>, BusError> {
            Ok(Vec::new())
        }
        async fn add_dead_letters(&self, batch: &[DeadLetter]) -> Result<(), BusError> {
            self.check()?;
            self.letters.fetch_add(batch.len(), Ordering::SeqCst);
            Ok(())
        }
        async fn dead_letters(
            &self,
            limit: usize,
            tenant: Option<&str>,
        ) -> Result<Vec<DeadLetter>, BusError> {
            self.inner.dead_letters(limit, tenant).await
        }
        async fn publish_groups(&self, batch: &[(String, Publication)]) -> Result<(), BusError> {
            self.check()?;
            self.inner.publish_groups(batch).await
        }
        async fn record(
            &self,
            batch: &[Publication],
            watched: &[bool],
            groups: &[Vec<String>],
            ids: &[u64],
        ) -> Result<Vec<Option<Position>>, BusError> {
            self.check()?;
            self.inner.record(batch, watched, groups, ids).await
        }
        async fn record_history(&self, publication: &Publication) -> Result<Position, BusError> {
            self.inner.record_history(publication).await
        }
        async fn history_tops(&self, tenants: &[String]) -> Result<Vec<Position>, BusError> {
            self.inner.history_tops(tenants).await
        }
        async fn history_after(
            &self,
            since: &Position,
            limit: usize,
        ) -> Result<Recovery, BusError> {
            self.inner.history_after(since, limit).await
        }
        async fn history_range(&self, query: &RangeQuery) -> Result<Vec<Recorded>, BusError> {
            self.inner.history_range(query).await
        }
        async fn add_records(&self, _: &[String]) -> Result<(), BusError> {
            self.check()
        }
    }

    fn letter() -> Effect {
        Effect::DeadLetter(DeadLetter::unroutable(
            SourceKind::Mqtt,
            "t",
            b"x",
            "no route".into(),
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn acknowledgements_wait_until_the_bus_took_the_effects_before_them() {
        let bus = Arc::new(Switchable {
            inner: MemoryBus::new(10, HistoryLimits::default()),
            down: AtomicBool::new(true),
            letters: AtomicUsize::new(0),
        });
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(apply_effects(
            Arc::new(Mutex::new(rx)),
            bus.clone(),
            None,
            Arc::new(Commands::in_process()),
        ));
        let acked = Arc::new(AtomicBool::new(false));
        tx.send(letter()).await.unwrap();
        let flag = acked.clone();
        tx.send(Effect::Acknowledge(vec![Completion::new(move || {
            flag.store(true, Ordering::SeqCst)
        })]))
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            !acked.load(Ordering::SeqCst),
            "the bus is down: not acknowledged"
        );
        bus.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(
            acked.load(Ordering::SeqCst),
            "acknowledged once the letter was kept"
        );
        assert_eq!(bus.letters.load(Ordering::SeqCst), 1);
        drop(tx);
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_backlog_stops_taking_effects_instead_of_dropping_them() {
        let bus = Arc::new(Switchable {
            inner: MemoryBus::new(10, HistoryLimits::default()),
            down: AtomicBool::new(true),
            letters: AtomicUsize::new(0),
        });
        let (tx, rx) = mpsc::channel(8);
        let task = tokio::spawn(apply_effects(
            Arc::new(Mutex::new(rx)),
            bus.clone(),
            None,
            Arc::new(Commands::in_process()),
        ));
        // The backlog fills, then the queue: the next send has to wait.
        let mut sent = 0;
        while let Ok(result) = tokio::time::timeout(Duration::from_secs(1), tx.send(letter())).await
        {
            result.unwrap();
            sent += 1;
        }
        assert_eq!(
            sent,
            BACKLOG + 8,
            "the backlog and the queue, then backpressure"
        );
        bus.down.store(false, Ordering::SeqCst);
        drop(tx);
        task.await.unwrap();
        assert_eq!(bus.letters.load(Ordering::SeqCst), sent, "none dropped");
    }
}
