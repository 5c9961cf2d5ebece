//! Dead letters: messages that could not be routed or parsed, kept with
//! their raw payload so nothing is lost silently.

use std::collections::VecDeque;
use std::sync::Mutex;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::message::{RawMessage, SourceKind, now_ms};
use crate::script::ScriptError;

/// How much of a `too_large` message's payload its dead letter keeps.
pub const KEPT_OF_TOO_LARGE: usize = 1024;

/// Why a message became a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// No route, product or device could be found for it.
    Unroutable,
    /// Its product has no script loaded.
    NoScript,
    /// The script refused it with its own error.
    ScriptError,
    /// The script trapped, timed out or hit its memory limit.
    ScriptTrap,
    /// The script's outputs broke the contract or the size limits.
    BadOutput,
    /// An output's timestamp lies outside the product's window.
    BadTimestamp,
    /// The message is larger than its source's limit (the payload kept is
    /// its beginning only).
    TooLarge,
    /// The device is not registered and this instance already keeps track
    /// of as many unregistered devices as `registry.max_unregistered` allows.
    DeviceLimit,
    /// A script output names a device the reporting device may not write
    /// (not its declared child, nor of its tenant where the product allows that).
    ForeignDevice,
    /// A command's script refused it or failed on it (the "payload" is
    /// the command as JSON).
    EncodeError,
}

impl Reason {
    /// The name used in JSON and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unroutable => "unroutable",
            Reason::NoScript => "no_script",
            Reason::ScriptError => "script_error",
            Reason::ScriptTrap => "script_trap",
            Reason::BadOutput => "bad_output",
            Reason::BadTimestamp => "bad_timestamp",
            Reason::TooLarge => "too_large",
            Reason::DeviceLimit => "device_limit",
            Reason::ForeignDevice => "foreign_device",
            Reason::EncodeError => "encode_error",
        }
    }

    /// The reason for a script failure.
    pub fn of(error: &ScriptError) -> Self {
        match error {
            ScriptError::Rejected { .. } | ScriptError::NotSupported { .. } => Reason::ScriptError,
            ScriptError::BadOutput { .. } | ScriptError::OutputTooLarge { .. } => Reason::BadOutput,
            ScriptError::BadTimestamp { .. } => Reason::BadTimestamp,
            ScriptError::Read { .. } | ScriptError::Compile { .. } | ScriptError::Link { .. } => {
                Reason::NoScript
            }
            ScriptError::Instantiate { .. }
            | ScriptError::Timeout { .. }
            | ScriptError::MemoryExceeded { .. }
            | ScriptError::Trap { .. } => Reason::ScriptTrap,
        }
    }
}

/// A message that could not be processed, with everything needed to replay it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// When it was dead-lettered, ms since the Unix epoch.
    pub at: i64,
    /// Why.
    pub reason: Reason,
    /// The error, for people.
    pub error: String,
    /// How the message arrived.
    pub source: String,
    /// Its topic (or path).
    pub topic: String,
    /// Its product, when known.
    pub product: String,
    /// Its device, when known.
    pub device_id: String,
    /// The tenant of its device (empty when unknown): who may read it.
    #[serde(default)]
    pub tenant_id: String,
    /// The script version that failed, when a script ran.
    pub script_version: String,
    /// The raw payload, base64; only its first [`KEPT_OF_TOO_LARGE`] bytes
    /// for a `too_large` message.
    pub payload_base64: String,
    /// The size of the payload as it arrived, in bytes.
    #[serde(default)]
    pub payload_size: usize,
    /// When it was received, ms since the Unix epoch.
    pub received_at: i64,
}

impl DeadLetter {
    /// A dead letter for `message`.
    pub fn of(message: &RawMessage, reason: Reason, error: String, script_version: &str) -> Self {
        DeadLetter {
            at: now_ms(),
            reason,
            error,
            source: message.source.as_str().to_owned(),
            topic: message.topic.clone(),
            product: message.product.clone(),
            device_id: message.device_id.clone(),
            tenant_id: String::new(),
            script_version: script_version.to_owned(),
            payload_base64: base64::engine::general_purpose::STANDARD.encode(&message.payload),
            payload_size: message.payload.len(),
            received_at: message.received_at,
        }
    }

    /// A dead letter for input that never became a message.
    pub fn unroutable(source: SourceKind, topic: &str, payload: &[u8], error: String) -> Self {
        Self::raw(Reason::Unroutable, source, topic, payload, error)
    }

    /// A dead letter for a message over its source's `limit` in bytes: the
    /// error names both sizes, the payload kept is its beginning.
    pub fn too_large(source: SourceKind, topic: &str, payload: &[u8], limit: u64) -> Self {
        let error = format!(
            "the message has {} bytes, over the limit of {limit}; its first {} bytes are kept",
            payload.len(),
            KEPT_OF_TOO_LARGE.min(payload.len())
        );
        let mut letter = Self::raw(
            Reason::TooLarge,
            source,
            topic,
            &payload[..KEPT_OF_TOO_LARGE.min(payload.len())],
            error,
        );
        letter.payload_size = payload.len();
        letter
    }

    fn raw(reason: Reason, source: SourceKind, topic: &str, payload: &[u8], error: String) -> Self {
        let now = now_ms();
        DeadLetter {
            at: now,
            reason,
            error,
            source: source.as_str().to_owned(),
            topic: topic.to_owned(),
            product: String::new(),
            device_id: String::new(),
            tenant_id: String::new(),
            script_version: String::new(),
            payload_base64: base64::engine::general_purpose::STANDARD.encode(payload),
            payload_size: payload.len(),
            received_at: now,
        }
    }
}

/// The newest dead letters in memory, oldest dropped first.
#[derive(Debug)]
pub struct DeadLetterRing {
    capacity: usize,
    letters: Mutex<VecDeque<DeadLetter>>,
}

impl DeadLetterRing {
    /// A ring holding up to `capacity` letters.
    pub fn new(capacity: usize) -> Self {
        DeadLetterRing {
            capacity: capacity.max(1),
            letters: Mutex::new(VecDeque::new()),
        }
    }

    /// Adds letters, dropping the oldest beyond capacity.
    pub fn push(&self, letters: impl IntoIterator<Item = DeadLetter>) {
        // Held for a few pushes; never across an await.
        let mut ring = self
            .letters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for letter in letters {
            if ring.len() == self.capacity {
                ring.pop_front();
            }
            ring.push_back(letter);
        }
    }

    /// The newest `limit` letters (of `tenant` only, when given), newest first.
    pub fn newest(&self, limit: usize, tenant: Option<&str>) -> Vec<DeadLetter> {
        let ring = self
            .letters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ring.iter()
            .rev()
            .filter(|l| tenant.is_none_or(|t| l.tenant_id == t))
            .take(limit)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest() {
        let ring = DeadLetterRing::new(3);
        ring.push((0..5).map(|i| {
            DeadLetter::unroutable(SourceKind::Mqtt, &format!("t/{i}"), b"x", "no route".into())
        }));
        let topics: Vec<String> = ring.newest(10, None).into_iter().map(|l| l.topic).collect();
        assert_eq!(topics, ["t/4", "t/3", "t/2"]);
        assert_eq!(ring.newest(1, None)[0].payload_base64, "eA==");
        assert!(
            ring.newest(10, Some("acme")).is_empty(),
            "no device of acme"
        );
    }
}
