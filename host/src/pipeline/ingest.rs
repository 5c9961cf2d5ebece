//! The way into the pipeline: sources hand envelopes to the worker that
//! owns the device, waiting while its queue is full.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::effects::Effect;
use super::envelope::{Completion, Envelope};
use super::shard::shard_for;
use crate::deadletter::DeadLetter;

/// The pipeline has stopped taking messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("sluice is shutting down and takes no more messages")]
pub struct Closed;

/// A handle sources use to submit work. Cheap to clone; the pipeline's
/// queues close when every handle is dropped.
#[derive(Debug, Clone)]
pub struct Ingest {
    queues: Arc<[mpsc::Sender<Envelope>]>,
    effects: mpsc::Sender<Effect>,
}

impl Ingest {
    pub(crate) fn new(queues: Vec<mpsc::Sender<Envelope>>, effects: mpsc::Sender<Effect>) -> Self {
        Ingest {
            queues: queues.into(),
            effects,
        }
    }

    /// Hands `envelope` to its device's worker, waiting while the queue is
    /// full: a source that awaits this stops reading, so backpressure
    /// reaches the device.
    pub async fn submit(&self, envelope: Envelope) -> Result<(), Closed> {
        let shard = shard_for(envelope.inbound.device(), self.queues.len());
        self.queues[shard].send(envelope).await.map_err(|_| Closed)
    }

    /// Whether the device's queue has room right now.
    pub fn has_room(&self, device: &str) -> bool {
        self.queues[shard_for(device, self.queues.len())].capacity() > 0
    }

    /// Keeps input that could not be routed.
    pub async fn dead_letter(&self, letter: DeadLetter) {
        self.dead_letter_then(letter, None).await;
    }

    /// Keeps input that could not be routed, and completes `done` (the
    /// message's acknowledgement) once the bus has taken the dead letter.
    pub async fn dead_letter_then(&self, letter: DeadLetter, done: Option<Completion>) {
        if self.effects.send(Effect::DeadLetter(letter)).await.is_err() {
            tracing::warn!("a dead letter arrived after the pipeline stopped");
            return;
        }
        if let Some(done) = done {
            let _ = self.effects.send(Effect::Acknowledge(vec![done])).await;
        }
    }
}
