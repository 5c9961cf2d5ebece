//! Effects: what workers hand to the bus (publications, status changes,
//! dead letters, records), applied in batches by one task so no message
//! waits on a network round trip. When the bus is down, publications are
//! dropped (they are live data), and status changes, dead letters and
//! records wait in bounded buffers until it is back.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::bus::{Bus, BusError, Publication, StatusChange};
use crate::deadletter::DeadLetter;
use crate::records::RecordsOutput;

/// One thing for the bus to do.
#[derive(Debug)]
pub enum Effect {
    /// Publish to the device's channel (already filtered by interest).
    Publish(Publication),
    /// Record a status change; publish it if watched.
    Transition {
        /// The change.
        change: StatusChange,
        /// Whether anyone watches the device.
        watched: bool,
    },
    /// Keep a dead letter.
    DeadLetter(DeadLetter),
    /// Append a processed record (JSON).
    Record(String),
}

/// Effects taken per batch, at most.
const BATCH: usize = 1024;
/// What waits for the bus while it is down, per kind.
const BACKLOG: usize = 100_000;

/// Applies effects until every sender is gone, then drains what is left.
pub async fn apply_effects(
    mut effects: mpsc::Receiver<Effect>,
    bus: Arc<dyn Bus>,
    records: Option<Arc<RecordsOutput>>,
) {
    let mut pending = Pending::default();
    let mut backoff = Duration::from_millis(100);
    let mut down_until: Option<Instant> = None;
    let mut received = Vec::with_capacity(BATCH);
    loop {
        let (count, timed_out) = match down_until {
            Some(until) => tokio::select! {
                n = effects.recv_many(&mut received, BATCH) => (n, false),
                _ = tokio::time::sleep_until(until) => (0, true),
            },
            None => (effects.recv_many(&mut received, BATCH).await, false),
        };
        let closed = count == 0 && !timed_out;
        pending.add(received.drain(..));
        let backing_off = down_until.is_some_and(|until| Instant::now() < until);
        if backing_off && !closed {
            // Live data cannot wait for the bus.
            pending.drop_publications();
            continue;
        }
        match pending.apply(&*bus, records.as_deref()).await {
            Ok(()) => {
                if down_until.take().is_some() {
                    tracing::info!(
                        bus = bus.kind(),
                        "bus reachable again; held effects delivered"
                    );
                }
                backoff = Duration::from_millis(100);
            }
            Err(error) => {
                if down_until.is_none() {
                    tracing::warn!(bus = bus.kind(), %error, "bus unavailable; dropping live publications, holding status changes, dead letters and records");
                }
                metrics::counter!("sluice_bus_errors_total", "op" => "apply").increment(1);
                pending.drop_publications();
                down_until = Some(Instant::now() + backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        if closed {
            if !pending.is_empty() {
                tracing::warn!(
                    waiting = pending.len(),
                    "stopping with effects the bus did not take"
                );
            }
            return;
        }
    }
}

#[derive(Default)]
struct Pending {
    publications: Vec<Publication>,
    transitions: VecDeque<(StatusChange, bool)>,
    dead_letters: VecDeque<DeadLetter>,
    records: VecDeque<String>,
}

impl Pending {
    fn add(&mut self, effects: impl Iterator<Item = Effect>) {
        for effect in effects {
            match effect {
                Effect::Publish(p) => self.publications.push(p),
                Effect::Transition { change, watched } => {
                    push_bounded(&mut self.transitions, (change, watched), "transition")
                }
                Effect::DeadLetter(letter) => {
                    metrics::counter!("sluice_deadletters_total", "reason" => letter.reason.as_str()).increment(1);
                    push_bounded(&mut self.dead_letters, letter, "dead_letter");
                }
                Effect::Record(record) => push_bounded(&mut self.records, record, "record"),
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn len(&self) -> usize {
        self.publications.len()
            + self.transitions.len()
            + self.dead_letters.len()
            + self.records.len()
    }

    fn drop_publications(&mut self) {
        if !self.publications.is_empty() {
            metrics::counter!("sluice_publish_dropped_total")
                .increment(self.publications.len() as u64);
            self.publications.clear();
        }
    }

    /// Applies everything; what failed stays pending.
    async fn apply(
        &mut self,
        bus: &dyn Bus,
        records: Option<&RecordsOutput>,
    ) -> Result<(), BusError> {
        if !self.publications.is_empty() {
            bus.publish(&self.publications).await?;
            for publication in &self.publications {
                metrics::counter!("sluice_publishes_total", "kind" => publication.kind())
                    .increment(1);
            }
            self.publications.clear();
        }
        if !self.transitions.is_empty() {
            let (changes, watched): (Vec<StatusChange>, Vec<bool>) =
                self.transitions.iter().cloned().unzip();
            let applied = bus.record_transitions(&changes, &watched).await?;
            for ((change, watched), applied) in changes.iter().zip(&watched).zip(applied) {
                if applied {
                    metrics::counter!("sluice_status_transitions_total", "source" => change.source.as_str()).increment(1);
                    if *watched {
                        metrics::counter!("sluice_publishes_total", "kind" => "status")
                            .increment(1);
                    }
                }
            }
            self.transitions.clear();
        }
        if !self.dead_letters.is_empty() {
            bus.add_dead_letters(self.dead_letters.make_contiguous())
                .await?;
            self.dead_letters.clear();
        }
        if let Some(output) = records
            && !self.records.is_empty()
        {
            output.write(bus, self.records.make_contiguous()).await?;
            metrics::counter!("sluice_records_total").increment(self.records.len() as u64);
            self.records.clear();
        }
        Ok(())
    }
}

fn push_bounded<T>(queue: &mut VecDeque<T>, item: T, kind: &'static str) {
    if queue.len() >= BACKLOG {
        queue.pop_front();
        metrics::counter!("sluice_backlog_dropped_total", "kind" => kind).increment(1);
    }
    queue.push_back(item);
}
