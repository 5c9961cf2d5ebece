//! Timers of the pipeline: status deadlines (expired locally, or swept
//! from the bus when it shares them) and the write-behind of latest values
//! and shared deadlines.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::effects::Effect;
use super::state::PipelineState;
use super::worker::transition_effect;
use crate::bus::StatusChange;
use crate::message::now_ms;

/// Deadlines swept per round trip.
const SWEEP_BATCH: usize = 1000;

/// Takes devices offline when their deadline passes, every `tick`, until
/// `shutdown`.
///
/// With a bus that shares deadlines, they are swept from the bus (each
/// instance takes a disjoint set), and only entries older than `grace`
/// are taken, so a refresh still being written behind is not overtaken.
pub async fn run_status_timers(
    state: Arc<PipelineState>,
    effects: mpsc::Sender<Effect>,
    tick: Duration,
    grace: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let outcome = if state.bus.shares_deadlines() {
            sweep_shared(&state, &effects, grace).await
        } else {
            expire_local(&state, &effects).await
        };
        if outcome.is_err() {
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

async fn sweep_shared(
    state: &PipelineState,
    effects: &mpsc::Sender<Effect>,
    grace: Duration,
) -> Result<(), ()> {
    loop {
        let cutoff = now_ms() - i64::try_from(grace.as_millis()).unwrap_or(0);
        let due = match state.bus.sweep_deadlines(cutoff, SWEEP_BATCH).await {
            Ok(due) => due,
            Err(error) => {
                metrics::counter!("sluice_bus_errors_total", "op" => "sweep").increment(1);
                tracing::debug!(%error, "cannot sweep deadlines; trying again next tick");
                return Ok(());
            }
        };
        let full = due.len() == SWEEP_BATCH;
        for (device, source) in due {
            let wall = now_ms();
            // The local view follows; whether the device really was online
            // is decided by the shared status table.
            state.status.expired_elsewhere(&device, source, wall);
            if let Some(deadlines) = &state.deadlines {
                deadlines.forget(&device);
            }
            let change = StatusChange {
                device_name: state.name_of(&device),
                is_online: false,
                timestamp: wall,
                source,
                device_id: device,
            };
            let watched = state.interest.is_watched(&change.device_id);
            effects
                .send(Effect::Transition { change, watched })
                .await
                .map_err(drop)?;
        }
        if !full {
            return Ok(());
        }
    }
}

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
