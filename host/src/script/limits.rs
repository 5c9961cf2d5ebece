//! Per-call limits on a script, and the memory limiter that enforces the cap.

use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// What one script call may use. Every product has its own; the defaults
/// suit sensor payloads of a few kilobytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Wall-clock time per message (a batch call gets this per message).
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// Cap on the script's linear memory.
    pub memory: ByteSize,
    /// Cap on the size of the outputs of one message.
    pub output: ByteSize,
    /// Cap on the number of outputs of one message.
    pub max_outputs: usize,
    /// Cap on the fields of one output (telemetry, attributes, an event).
    pub max_fields: usize,
    /// Cap on the keys of one device's latest-values snapshot (telemetry
    /// and attributes each); keys beyond it are not kept, and counted.
    pub snapshot_keys: usize,
    /// How far in the past an output's timestamp may lie; an older one
    /// makes the message a `bad_timestamp` dead letter.
    #[serde(with = "humantime_serde")]
    pub timestamp_past: Duration,
    /// How far in the future an output's timestamp may lie.
    #[serde(with = "humantime_serde")]
    pub timestamp_future: Duration,
    /// Cap on the state kept for one device.
    pub state_per_device: ByteSize,
    /// Cap on how many devices one product instance keeps state for.
    pub state_devices: u32,
    /// Log lines a script may write per message; the rest are counted and dropped.
    pub log_lines: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            deadline: Duration::from_millis(50),
            memory: ByteSize::mib(32),
            output: ByteSize::mib(1),
            max_outputs: 1000,
            max_fields: 1000,
            snapshot_keys: 1000,
            timestamp_past: Duration::from_secs(10 * 365 * 24 * 3600),
            timestamp_future: Duration::from_secs(24 * 3600),
            state_per_device: ByteSize::kib(4),
            state_devices: 1_000_000,
            log_lines: 20,
        }
    }
}

impl Limits {
    pub(crate) fn memory_bytes(&self) -> usize {
        usize::try_from(self.memory.as_u64()).unwrap_or(usize::MAX)
    }

    pub(crate) fn output_bytes(&self) -> usize {
        usize::try_from(self.output.as_u64()).unwrap_or(usize::MAX)
    }

    pub(crate) fn state_bytes(&self) -> u32 {
        u32::try_from(self.state_per_device.as_u64()).unwrap_or(u32::MAX)
    }
}

/// The most table elements a script may grow to.
const TABLE_ELEMENTS: usize = 100_000;

/// Raised from inside `memory.grow` so the call traps with the reason attached.
#[derive(Debug, thiserror::Error)]
#[error("memory limit exceeded: {current} bytes, asked for {requested}, limit {limit}")]
pub(crate) struct MemoryExceeded {
    pub(crate) current: usize,
    pub(crate) requested: usize,
    pub(crate) limit: usize,
}

/// Refuses linear memory growth beyond the cap by trapping the call, and
/// keeps the size of the instance's memories.
#[derive(Debug)]
pub(crate) struct MemoryLimiter {
    limit: usize,
    /// Bytes of all linear memories of the instance.
    total: usize,
}

impl MemoryLimiter {
    pub(crate) fn new(limit: usize) -> Self {
        MemoryLimiter { limit, total: 0 }
    }

    /// Bytes of all linear memories of the instance now.
    pub(crate) fn total(&self) -> usize {
        self.total
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            // Trapping (rather than failing the grow) keeps the reason: a Rust
            // guest would otherwise abort with an anonymous `unreachable`.
            return Err(MemoryExceeded {
                current,
                requested: desired,
                limit: self.limit,
            }
            .into());
        }
        self.total = self.total.saturating_add(desired.saturating_sub(current));
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= TABLE_ELEMENTS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter;

    #[test]
    fn limits_parse_human_units() {
        let limits: Limits =
            serde_json::from_str(r#"{"deadline": "20ms", "memory": "16 MiB", "output": "64 KiB"}"#)
                .unwrap();
        assert_eq!(limits.deadline, Duration::from_millis(20));
        assert_eq!(limits.memory_bytes(), 16 << 20);
        assert_eq!(limits.output_bytes(), 64 << 10);
        assert_eq!(limits.max_outputs, Limits::default().max_outputs);
    }

    #[test]
    fn unknown_limit_names_are_refused() {
        let err = serde_json::from_str::<Limits>(r#"{"dedline": "20ms"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `dedline`"), "{err}");
    }

    #[test]
    fn growth_past_the_cap_traps_with_the_numbers() {
        let mut limiter = MemoryLimiter::new(1 << 20);
        assert!(limiter.memory_growing(0, 1 << 20, None).unwrap());
        assert_eq!(limiter.total(), 1 << 20);
        let err = limiter.memory_growing(1 << 20, 2 << 20, None).unwrap_err();
        let exceeded = err.downcast_ref::<MemoryExceeded>().unwrap();
        assert_eq!(
            (exceeded.current, exceeded.requested, exceeded.limit),
            (1 << 20, 2 << 20, 1 << 20)
        );
    }
}
