//! What the bus carries, and the channel names and JSON payloads that are
//! a contract with other systems (dashboards written for the seed
//! platform read `ws:device:*` and `device:*:status`).

use serde::{Deserialize, Serialize};

use super::history::Position;
use crate::commands::CommandRecord;
use crate::script::{Fields, Severity};
use crate::status::StatusSource;

/// One message on the bus, about one device.
#[derive(Debug, Clone, PartialEq)]
pub enum Publication {
    /// A telemetry report.
    Telemetry(TelemetryReport),
    /// A status transition.
    Status(StatusChange),
    /// An alert raised by a script.
    Alert(AlertRaised),
    /// An event reported by a script.
    Event(EventReported),
    /// A command's state change (kept in history; announced by the
    /// commands service, not published on a device channel).
    Command(Box<CommandRecord>),
}

/// `ws:device:{device}`: `{"device_id","tenant_id","timestamp","data":{…}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryReport {
    /// The device.
    pub device_id: String,
    /// Its tenant (empty when unregistered).
    pub tenant_id: String,
    /// When measured, ms since the Unix epoch.
    pub timestamp: i64,
    /// The reported values.
    pub data: Fields,
    /// On a group channel: every group of the device (so a watcher of
    /// several of them takes the report once). Left out when empty, so
    /// the device channel carries the seed's JSON.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

/// `device:{device}:status`:
/// `{"device_id","device_name","is_online","timestamp","source"}`;
/// `is_online` is `1` or `0`, as the seed platform's dashboards expect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusChange {
    /// The device.
    pub device_id: String,
    /// Its name (the id when unregistered).
    pub device_name: String,
    /// `1` online, `0` offline.
    #[serde(serialize_with = "as_int", deserialize_with = "from_int")]
    pub is_online: bool,
    /// When it changed, ms since the Unix epoch.
    pub timestamp: i64,
    /// Why: `status_message`, `message`, `heartbeat_expired`, `timeout_expired`.
    #[serde(serialize_with = "source_name", deserialize_with = "from_source_name")]
    pub source: StatusSource,
    /// Its tenant (sluice's addition to the seed's JSON; left out when
    /// empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tenant_id: String,
    /// Where it stands in its tenant's history, once recorded there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<Position>,
}

/// `sluice:alert:{device}`: `{"device_id","tenant_id","timestamp","severity","title","description"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRaised {
    /// The device.
    pub device_id: String,
    /// Its tenant.
    pub tenant_id: String,
    /// When raised, ms since the Unix epoch.
    pub timestamp: i64,
    /// How serious.
    pub severity: Severity,
    /// One line naming the condition.
    pub title: String,
    /// What happened.
    pub description: String,
    /// Where it stands in its tenant's history, once recorded there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<Position>,
}

/// `sluice:event:{device}`: `{"device_id","tenant_id","timestamp","name","data":{…}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventReported {
    /// The device.
    pub device_id: String,
    /// Its tenant.
    pub tenant_id: String,
    /// When it happened, ms since the Unix epoch.
    pub timestamp: i64,
    /// The event name.
    pub name: String,
    /// Its details.
    pub data: Fields,
    /// Where it stands in its tenant's history, once recorded there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<Position>,
}

/// `value` as JSON text; `None` (logged and counted) if it cannot be,
/// so no device data can stop the task that formats it.
pub fn json_text<T: Serialize + ?Sized>(value: &T, what: &'static str) -> Option<String> {
    match serde_json::to_string(value) {
        Ok(text) => Some(text),
        Err(error) => {
            metrics::counter!("sluice_format_errors_total", "what" => what).increment(1);
            tracing::warn!(%error, what, "cannot format as JSON; skipped");
            None
        }
    }
}

fn as_int<S: serde::Serializer>(online: &bool, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u8(u8::from(*online))
}

fn from_int<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Bool(online) => Ok(online),
        serde_json::Value::Number(n) => Ok(n.as_i64() == Some(1)),
        other => Err(serde::de::Error::custom(format!(
            "is_online must be 1, 0 or a boolean, not {other}"
        ))),
    }
}

fn from_source_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<StatusSource, D::Error> {
    let name = String::deserialize(d)?;
    StatusSource::parse(&name)
        .ok_or_else(|| serde::de::Error::custom(format!("unknown status source {name:?}")))
}

fn source_name<S: serde::Serializer>(source: &StatusSource, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(source.as_str())
}

/// The telemetry channel of `device`.
pub fn telemetry_channel(device: &str) -> String {
    format!("ws:device:{device}")
}

/// The status channel of `device`.
pub fn status_channel(device: &str) -> String {
    format!("device:{device}:status")
}

/// The alert channel of `device`.
pub fn alert_channel(device: &str) -> String {
    format!("sluice:alert:{device}")
}

/// The event channel of `device`.
pub fn event_channel(device: &str) -> String {
    format!("sluice:event:{device}")
}

/// The channel prefixes of a watched group, one per kind (telemetry,
/// status, alerts, events): `ws:group:{group}`, `ws:group-status:{group}`,
/// `ws:group-alert:{group}`, `ws:group-event:{group}`. None is the start
/// of another, so a channel names its kind and group whatever the group's
/// name.
const GROUP_PREFIXES: [&str; 4] = [
    "ws:group:",
    "ws:group-status:",
    "ws:group-alert:",
    "ws:group-event:",
];

/// The pattern of every group channel, of every kind.
pub const GROUP_PATTERN: &str = "ws:group*";

impl Publication {
    /// The device it is about.
    pub fn device(&self) -> &str {
        match self {
            Publication::Telemetry(t) => &t.device_id,
            Publication::Status(s) => &s.device_id,
            Publication::Alert(a) => &a.device_id,
            Publication::Event(e) => &e.device_id,
            Publication::Command(c) => &c.device_id,
        }
    }

    /// Its tenant (empty when unregistered).
    pub fn tenant(&self) -> &str {
        match self {
            Publication::Telemetry(t) => &t.tenant_id,
            Publication::Status(s) => &s.tenant_id,
            Publication::Alert(a) => &a.tenant_id,
            Publication::Event(e) => &e.tenant_id,
            Publication::Command(c) => &c.tenant_id,
        }
    }

    /// Where it stands in its tenant's history, once recorded there.
    pub fn position(&self) -> Option<&Position> {
        match self {
            Publication::Telemetry(_) => None,
            Publication::Status(s) => s.position.as_ref(),
            Publication::Alert(a) => a.position.as_ref(),
            Publication::Event(e) => e.position.as_ref(),
            Publication::Command(c) => c.position.as_ref(),
        }
    }

    /// The same, recorded at `position` (telemetry has none).
    pub fn at(mut self, position: Position) -> Publication {
        match &mut self {
            Publication::Telemetry(_) => {}
            Publication::Status(s) => s.position = Some(position),
            Publication::Alert(a) => a.position = Some(position),
            Publication::Event(e) => e.position = Some(position),
            Publication::Command(c) => c.position = Some(position),
        }
        self
    }

    /// The channel it goes to.
    pub fn channel(&self) -> String {
        let device = self.device();
        match self {
            Publication::Telemetry(_) => telemetry_channel(device),
            Publication::Status(_) => status_channel(device),
            Publication::Alert(_) => alert_channel(device),
            Publication::Event(_) => event_channel(device),
            Publication::Command(_) => crate::commands::redis::CHANNEL.to_owned(),
        }
    }

    /// The contract JSON payload; `None` (counted) if it cannot be written.
    pub fn payload(&self) -> Option<String> {
        match self {
            Publication::Telemetry(t) => json_text(t, "publication"),
            Publication::Status(s) => json_text(s, "publication"),
            Publication::Alert(a) => json_text(a, "publication"),
            Publication::Event(e) => json_text(e, "publication"),
            Publication::Command(c) => json_text(c, "publication"),
        }
    }

    /// The JSON for the channel of `group`: the publication's, with `group`.
    pub fn group_payload(&self, group: &str) -> Option<String> {
        let payload = self.payload()?;
        let group = json_text(group, "publication")?;
        let body = payload.strip_suffix('}')?;
        Some(format!("{body},\"group\":{group}}}"))
    }

    /// The channel of `group` this publication goes to as a member's
    /// (none for command state changes).
    pub fn group_channel(&self, group: &str) -> Option<String> {
        let prefix = match self {
            Publication::Telemetry(_) => GROUP_PREFIXES[0],
            Publication::Status(_) => GROUP_PREFIXES[1],
            Publication::Alert(_) => GROUP_PREFIXES[2],
            Publication::Event(_) => GROUP_PREFIXES[3],
            Publication::Command(_) => return None,
        };
        Some(format!("{prefix}{group}"))
    }

    /// The four channels of `group`.
    pub fn group_channels(group: &str) -> [String; 4] {
        GROUP_PREFIXES.map(|prefix| format!("{prefix}{group}"))
    }

    /// The group a group channel is of; `None` when `channel` is not one.
    pub fn group_of(channel: &str) -> Option<&str> {
        GROUP_PREFIXES
            .iter()
            .find_map(|prefix| channel.strip_prefix(prefix))
    }

    /// Parses what arrived on a group channel: a member's publication of
    /// the channel's kind.
    pub fn parse_group(channel: &str, payload: &[u8]) -> Result<Publication, String> {
        let bad = |e: serde_json::Error| format!("{channel}: {e}");
        let kind = GROUP_PREFIXES
            .iter()
            .position(|prefix| channel.starts_with(prefix));
        match kind {
            Some(0) => serde_json::from_slice(payload).map(Publication::Telemetry),
            Some(1) => serde_json::from_slice(payload).map(Publication::Status),
            Some(2) => serde_json::from_slice(payload).map(Publication::Alert),
            Some(3) => serde_json::from_slice(payload).map(Publication::Event),
            _ => return Err(format!("{channel}: not a group channel")),
        }
        .map_err(bad)
    }

    /// Parses what arrived on `channel` (one of the four per-device channels).
    pub fn parse(channel: &str, payload: &[u8]) -> Result<Publication, String> {
        let bad = |e: serde_json::Error| format!("{channel}: {e}");
        if channel.starts_with("ws:device:") {
            serde_json::from_slice(payload)
                .map(Publication::Telemetry)
                .map_err(bad)
        } else if channel.starts_with("sluice:alert:") {
            serde_json::from_slice(payload)
                .map(Publication::Alert)
                .map_err(bad)
        } else if channel.starts_with("sluice:event:") {
            serde_json::from_slice(payload)
                .map(Publication::Event)
                .map_err(bad)
        } else if channel.starts_with("device:") && channel.ends_with(":status") {
            serde_json::from_slice(payload)
                .map(Publication::Status)
                .map_err(bad)
        } else {
            Err(format!("{channel}: not a device channel"))
        }
    }

    /// The four channels of `device`.
    pub fn channels(device: &str) -> [String; 4] {
        [
            telemetry_channel(device),
            status_channel(device),
            alert_channel(device),
            event_channel(device),
        ]
    }

    /// A short kind name for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Publication::Telemetry(_) => "telemetry",
            Publication::Status(_) => "status",
            Publication::Alert(_) => "alert",
            Publication::Event(_) => "event",
            Publication::Command(_) => "command",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn payloads_match_the_contract() {
        let telemetry = Publication::Telemetry(TelemetryReport {
            device_id: "th-1".into(),
            tenant_id: "acme".into(),
            timestamp: 1_732_262_400_000,
            data: Fields::new().with("temperature", 21.5).with("ok", true),
            groups: Vec::new(),
        });
        assert_eq!(telemetry.channel(), "ws:device:th-1");
        assert_eq!(
            telemetry.payload().unwrap(),
            r#"{"device_id":"th-1","tenant_id":"acme","timestamp":1732262400000,"data":{"temperature":21.5,"ok":true}}"#
        );
        let status = Publication::Status(StatusChange {
            device_id: "th-1".into(),
            device_name: "Lab".into(),
            is_online: true,
            timestamp: 5,
            source: StatusSource::HeartbeatExpired,
            tenant_id: String::new(),
            position: None,
        });
        assert_eq!(status.channel(), "device:th-1:status");
        let value: serde_json::Value = serde_json::from_str(&status.payload().unwrap()).unwrap();
        assert_eq!(
            value,
            json!({"device_id": "th-1", "device_name": "Lab", "is_online": 1, "timestamp": 5, "source": "heartbeat_expired"})
        );
        for publication in [telemetry, status] {
            let parsed = Publication::parse(
                &publication.channel(),
                publication.payload().unwrap().as_bytes(),
            );
            assert_eq!(parsed, Ok(publication));
        }
        assert!(Publication::parse("ws:device:x", b"{}").is_err());
    }
}
