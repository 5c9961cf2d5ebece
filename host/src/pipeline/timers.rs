//! Timers of the pipeline: status deadlines (expired locally, or swept
//! from the bus when it shares them), the write-behind of latest values
//! and shared deadlines, and, with a shared bus, following the status
//! changes every instance records.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::effects::{Effect, group_copies};
use super::state::PipelineState;
use super::worker::transition_effect;
use crate::bus::{Followed, Publication, Reconnect, RedisTarget, TransitionFeed};
use crate::message::now_ms;

/// Deadlines swept per round trip.
const SWEEP_BATCH: usize = 1000;

/// After the shared deadlines could not be swept (Redis unreachable, or
/// moving to a new master), how long sweeping waits once Redis answers
/// again: the deadline refreshes every instance held meanwhile land first,
/// so a device that kept reporting is not taken offline by a deadline the
/// outage let pass.
const RESUME_HOLD: Duration = Duration::from_secs(2);

/// Where sweeping the shared deadlines stands.
#[derive(Debug, Clone, Copy)]
enum Sweeping {
    Running,
    /// The last sweep failed.
    Failed,
    /// Redis answers again; sweeping resumes at this instant.
    HeldUntil(Instant),
}

/// Takes devices offline when their deadline passes, every `tick`, until
/// `shutdown`.
///
/// With a bus that shares deadlines, they are swept from the bus (each
/// instance takes a disjoint set, and records the offline in the same
/// atomic step), and only deadlines at least `grace` old are taken, so a
/// refresh still being written behind is not overtaken.
pub async fn run_status_timers(
    state: Arc<PipelineState>,
    effects: mpsc::Sender<Effect>,
    tick: Duration,
    grace: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweeping = Sweeping::Running;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        if state.bus.shares_deadlines() {
            sweeping = sweep_shared(&state, grace, sweeping).await;
        } else if expire_local(&state, &effects).await.is_err() {
            return;
        }
    }
}

async fn expire_local(state: &PipelineState, effects: &mpsc::Sender<Effect>) -> Result<(), ()> {
    for transition in state.status.expire(Instant::now(), now_ms()) {
        effects
            .send(transition_effect(state, transition))
            .await
            .map_err(drop)?;
    }
    Ok(())
}

async fn sweep_shared(state: &PipelineState, grace: Duration, sweeping: Sweeping) -> Sweeping {
    match sweeping {
        Sweeping::Failed => {
            return match state.bus.ping().await {
                Ok(()) => Sweeping::HeldUntil(Instant::now() + RESUME_HOLD + grace),
                Err(_) => Sweeping::Failed,
            };
        }
        Sweeping::HeldUntil(at) if Instant::now() < at => return sweeping,
        _ => {}
    }
    loop {
        let now = now_ms();
        let cutoff = now.saturating_sub(i64::try_from(grace.as_millis()).unwrap_or(i64::MAX));
        let recorded = match state.bus.sweep_deadlines(cutoff, now, SWEEP_BATCH).await {
            Ok(recorded) => recorded,
            Err(error) => {
                metrics::counter!("sluice_bus_errors_total", "op" => "sweep").increment(1);
                tracing::debug!(%error, "cannot sweep deadlines; trying again once Redis answers");
                return Sweeping::Failed;
            }
        };
        // Every tracker, this one's included, follows them from the feed;
        // the sweep published each to its device's channel when watched,
        // and its watched groups get their copies here.
        let mut copies = Vec::new();
        for change in &recorded {
            metrics::counter!("sluice_status_transitions_total", "source" => change.source.as_str())
                .increment(1);
            let groups = state.watched_groups(&change.device_id).0;
            if !groups.is_empty() && change.position.is_some() {
                copies.extend(group_copies(Publication::Status(change.clone()), groups));
            }
        }
        if !copies.is_empty()
            && let Err(error) = state.bus.publish_groups(&copies).await
        {
            metrics::counter!("sluice_publish_dropped_total").increment(copies.len() as u64);
            tracing::debug!(%error, "could not publish expiries to watched groups");
        }
        if recorded.len() < SWEEP_BATCH {
            return Sweeping::Running;
        }
    }
}

/// Applies what the shared status table recorded to this instance's
/// trackers, as one entry of the feed; an expiry that a newer message seen
/// here overtook turns the device online again.
pub async fn follow_change(
    state: &PipelineState,
    effects: &mpsc::Sender<Effect>,
    followed: Followed,
) -> Result<(), ()> {
    let change = followed.change;
    let transition = state.status.follow(
        &change.device_id,
        change.is_online,
        change.timestamp,
        change.source,
        followed.deadline_ms,
        now_ms(),
    );
    if let Some(transition) = transition {
        effects
            .send(transition_effect(state, transition))
            .await
            .map_err(drop)?;
    }
    Ok(())
}

/// Loads the whole shared status table into this instance's trackers.
pub async fn follow_table(state: &PipelineState) -> Result<usize, crate::bus::BusError> {
    let statuses = state.bus.load_status().await?;
    let now = now_ms();
    for (device, status) in &statuses {
        state.status.follow(
            device,
            status.online,
            status.since_ms,
            status.source,
            None,
            now,
        );
    }
    Ok(statuses.len())
}

/// Follows the transitions feed until `shutdown`: every change any
/// instance records reaches this instance's trackers. On a lost
/// connection it reopens the feed and reloads the whole table, so nothing
/// missed meanwhile stays missed.
pub async fn follow_transitions(
    state: Arc<PipelineState>,
    effects: mpsc::Sender<Effect>,
    target: RedisTarget,
    mut feed: Option<TransitionFeed>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut reconnect = Reconnect::new(&target);
    loop {
        let mut current = match feed.take() {
            Some(current) => current,
            None => {
                let opened = match TransitionFeed::open(&reconnect.client(), FEED_BLOCK).await {
                    Ok(opened) => follow_table(&state).await.map(|_| opened),
                    Err(error) => Err(error),
                };
                // Redis may have come back empty: write every deadline again.
                if opened.is_ok()
                    && let Some(deadlines) = &state.deadlines
                {
                    deadlines.rewrite_all();
                }
                match opened {
                    Ok(opened) => opened,
                    Err(error) => {
                        metrics::counter!("sluice_bus_errors_total", "op" => "feed").increment(1);
                        tracing::warn!(%error, retry_in = ?reconnect.backoff(), "cannot follow status changes; retrying");
                        if !reconnect.pause(&mut shutdown).await {
                            return;
                        }
                        continue;
                    }
                }
            }
        };
        reconnect.connected();
        loop {
            let read = tokio::select! {
                read = current.next() => read,
                error = reconnect.moved() => Err(crate::bus::BusError::Unavailable(error.to_string())),
                _ = shutdown.changed() => return,
            };
            match read {
                Ok(changes) => {
                    for followed in changes {
                        if follow_change(&state, &effects, followed).await.is_err() {
                            return;
                        }
                    }
                }
                Err(error) => {
                    metrics::counter!("sluice_bus_errors_total", "op" => "feed").increment(1);
                    tracing::warn!(%error, "lost the status feed; reopening it");
                    break;
                }
            }
        }
    }
}

/// How long one read of the feed waits for new changes.
const FEED_BLOCK: Duration = Duration::from_secs(2);

/// Writes latest values and shared deadlines behind to the bus every
/// `every`, and once more at `shutdown`. What the bus does not take is kept
/// for the next round.
pub async fn run_write_behind(
    state: Arc<PipelineState>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = ticker.tick() => false,
            _ = shutdown.changed() => true,
        };
        write_behind(&state).await;
        if stopping {
            return;
        }
    }
}

async fn write_behind(state: &PipelineState) {
    let latest = state.latest.take_pending();
    if !latest.is_empty()
        && let Err(error) = state.bus.store_latest(&latest).await
    {
        metrics::counter!("sluice_bus_errors_total", "op" => "latest").increment(1);
        tracing::debug!(%error, devices = latest.len(), "latest values not written; keeping them for the next round");
        state.latest.restore_pending(latest);
    }
    if let Some(deadlines) = &state.deadlines {
        let pending = deadlines.take_pending();
        if !pending.is_empty()
            && let Err(error) = state.bus.store_deadlines(&pending).await
        {
            metrics::counter!("sluice_bus_errors_total", "op" => "deadlines").increment(1);
            tracing::debug!(%error, devices = pending.len(), "deadlines not written; keeping them for the next round");
            deadlines.restore_pending(pending);
        }
    }
}
