//! Status modes: how a product decides whether its devices are online.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How online/offline is decided for a product's devices (overridable per
/// device in the registry).
///
/// In configuration: `status = { mode = "message" }`,
/// `{ mode = "heartbeat", interval = "60s" }` or `{ mode = "timeout", after = "5m" }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum StatusMode {
    /// Only explicit signals (the status topic, a script's `status`
    /// output) change the status. No timers.
    #[default]
    Message,
    /// Every message refreshes a deadline; the first message after offline
    /// makes the device online; the deadline passing makes it offline
    /// (`heartbeat_expired`). The device's own status signals are ignored.
    Heartbeat {
        /// How long a device may stay silent.
        #[serde(with = "humantime_serde")]
        interval: Duration,
    },
    /// Explicit signals are honoured; any message marks or keeps the device
    /// online and refreshes the deadline; silence makes it offline
    /// (`timeout_expired`).
    Timeout {
        /// How long a device may stay silent.
        #[serde(with = "humantime_serde")]
        after: Duration,
    },
}

impl StatusMode {
    /// The silence after which the device goes offline, if the mode has one.
    pub fn deadline(&self) -> Option<Duration> {
        match *self {
            StatusMode::Message => None,
            StatusMode::Heartbeat { interval } => Some(interval),
            StatusMode::Timeout { after } => Some(after),
        }
    }

    /// The lower-case name of the mode.
    pub fn name(&self) -> &'static str {
        match self {
            StatusMode::Message => "message",
            StatusMode::Heartbeat { .. } => "heartbeat",
            StatusMode::Timeout { .. } => "timeout",
        }
    }
}

/// Why a device's status changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatusSource {
    /// An explicit signal: the status topic or a script's `status` output.
    StatusMessage,
    /// A message arrived from a device that was offline (heartbeat and timeout modes).
    Message,
    /// No message within the heartbeat interval.
    HeartbeatExpired,
    /// No message within the timeout.
    TimeoutExpired,
}

impl StatusSource {
    /// The name used in JSON and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            StatusSource::StatusMessage => "status_message",
            StatusSource::Message => "message",
            StatusSource::HeartbeatExpired => "heartbeat_expired",
            StatusSource::TimeoutExpired => "timeout_expired",
        }
    }

    /// The source for `name`, as [`StatusSource::as_str`] writes it.
    pub fn parse(name: &str) -> Option<Self> {
        [
            StatusSource::StatusMessage,
            StatusSource::Message,
            StatusSource::HeartbeatExpired,
            StatusSource::TimeoutExpired,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_read_from_configuration() {
        let heartbeat: StatusMode =
            serde_json::from_str(r#"{"mode": "heartbeat", "interval": "90s"}"#).unwrap();
        assert_eq!(
            heartbeat,
            StatusMode::Heartbeat {
                interval: Duration::from_secs(90)
            }
        );
        let message: StatusMode = serde_json::from_str(r#"{"mode": "message"}"#).unwrap();
        assert_eq!(message.deadline(), None);
        let err = serde_json::from_str::<StatusMode>(r#"{"mode": "timeout"}"#).unwrap_err();
        assert!(err.to_string().contains("missing field `after`"), "{err}");
        for source in [
            "status_message",
            "message",
            "heartbeat_expired",
            "timeout_expired",
        ] {
            assert_eq!(StatusSource::parse(source).unwrap().as_str(), source);
        }
    }
}
