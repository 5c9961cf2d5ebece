//! What travels from a source to a worker: a message or a status signal,
//! and what to do once it has been processed.

use tokio::sync::oneshot;

use crate::message::{RawMessage, SourceKind};
use crate::script::{CommandCall, Downlink, ScriptError};

/// One unit of work for a worker.
#[derive(Debug)]
pub struct Envelope {
    /// The message or signal.
    pub inbound: Inbound,
    /// Runs when the worker is done with it (acknowledges it at the source).
    pub done: Option<Completion>,
}

/// What arrived.
#[derive(Debug)]
pub enum Inbound {
    /// A data message for its product's script.
    Data(RawMessage),
    /// An explicit status signal (the status topic).
    Status {
        /// The device.
        device: String,
        /// Online or offline.
        online: bool,
        /// Where it came from.
        source: SourceKind,
    },
    /// A command for the device, for its product's `encode` (run by the
    /// worker that parses the device's messages, so the script sees the
    /// same per-device state).
    Encode {
        /// The command.
        call: CommandCall,
        /// Where the downlinks, or why there are none, go.
        answer: oneshot::Sender<Result<Vec<Downlink>, ScriptError>>,
    },
}

impl Inbound {
    /// The device it is about.
    pub fn device(&self) -> &str {
        match self {
            Inbound::Data(message) => &message.device_id,
            Inbound::Status { device, .. } => device,
            Inbound::Encode { call, .. } => &call.device_id,
        }
    }
}

impl Envelope {
    /// An envelope that needs no acknowledgement.
    pub fn new(inbound: Inbound) -> Self {
        Envelope {
            inbound,
            done: None,
        }
    }
}

/// Acknowledges a message at its source once a worker has finished it,
/// whether it succeeded or was dead-lettered. A message dropped unfinished
/// (sluice stopped before a worker reached it) is never acknowledged, so
/// the source delivers it again.
pub struct Completion {
    on_done: Box<dyn FnOnce() + Send>,
}

impl Completion {
    /// Calls `on_done` on [`Completion::complete`].
    pub fn new(on_done: impl FnOnce() + Send + 'static) -> Self {
        Completion {
            on_done: Box::new(on_done),
        }
    }

    /// The message is finished.
    pub fn complete(self) {
        (self.on_done)();
    }
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Completion")
    }
}
