//! What a script produces, as the rest of sluice sees it.

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

use super::fields::Fields;

/// How serious an alert is, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Worth knowing.
    Info,
    /// Needs attention soon.
    Warning,
    /// Needs action now.
    Critical,
}

impl Severity {
    /// The lower-case name used in JSON and filters.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// What one output reports.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum OutputKind {
    /// Measured values, merged into the device's latest snapshot.
    Telemetry {
        /// The values.
        fields: Fields,
    },
    /// Slowly changing properties.
    Attributes {
        /// The properties.
        fields: Fields,
    },
    /// A named occurrence.
    Event {
        /// Its name.
        name: String,
        /// Its details.
        #[serde(default)]
        fields: Fields,
    },
    /// A condition a person should see.
    Alert {
        /// How serious.
        severity: Severity,
        /// One line naming the condition.
        title: String,
        /// What happened.
        description: String,
    },
    /// An explicit online or offline signal.
    Status {
        /// `true` for online.
        online: bool,
    },
    /// The device's answer to a command sluice sent it.
    Reply {
        /// The command's id.
        command_id: String,
        /// `true` when the device did what the command asked.
        ok: bool,
        /// Why it failed (empty when `ok`).
        #[serde(default)]
        error: String,
        /// The reply's values.
        #[serde(default)]
        fields: Fields,
    },
}

impl OutputKind {
    /// The lower-case name of the kind, as in the JSON `type`.
    pub fn name(&self) -> &'static str {
        match self {
            OutputKind::Telemetry { .. } => "telemetry",
            OutputKind::Attributes { .. } => "attributes",
            OutputKind::Event { .. } => "event",
            OutputKind::Alert { .. } => "alert",
            OutputKind::Status { .. } => "status",
            OutputKind::Reply { .. } => "reply",
        }
    }
}

/// One result of parsing a message.
///
/// As JSON (what `sluice script test` prints and fixtures expect):
/// `{"type": "telemetry", "device_id": "…", "timestamp": 1700000000000, "fields": {…}}`,
/// with `device_id` and `timestamp` left out when the script did not set them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(from = "OutputRepr")]
pub struct Output {
    /// The device it is about; `None` for the message's own device.
    pub device_id: Option<String>,
    /// When it was measured (ms since the Unix epoch); `None` for the receive time.
    pub timestamp: Option<i64>,
    /// What it reports.
    pub kind: OutputKind,
}

#[derive(Deserialize)]
struct OutputRepr {
    #[serde(default)]
    device_id: Option<String>,
    #[serde(default)]
    timestamp: Option<i64>,
    #[serde(flatten)]
    kind: OutputKind,
}

impl From<OutputRepr> for Output {
    fn from(repr: OutputRepr) -> Self {
        Output {
            device_id: repr.device_id,
            timestamp: repr.timestamp,
            kind: repr.kind,
        }
    }
}

impl Serialize for Output {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("type", self.kind.name())?;
        if let Some(device_id) = &self.device_id {
            map.serialize_entry("device_id", device_id)?;
        }
        if let Some(timestamp) = self.timestamp {
            map.serialize_entry("timestamp", &timestamp)?;
        }
        match &self.kind {
            OutputKind::Telemetry { fields } | OutputKind::Attributes { fields } => {
                map.serialize_entry("fields", fields)?;
            }
            OutputKind::Event { name, fields } => {
                map.serialize_entry("name", name)?;
                map.serialize_entry("fields", fields)?;
            }
            OutputKind::Alert {
                severity,
                title,
                description,
            } => {
                map.serialize_entry("severity", severity)?;
                map.serialize_entry("title", title)?;
                map.serialize_entry("description", description)?;
            }
            OutputKind::Status { online } => map.serialize_entry("online", online)?,
            OutputKind::Reply {
                command_id,
                ok,
                error,
                fields,
            } => {
                map.serialize_entry("command_id", command_id)?;
                map.serialize_entry("ok", ok)?;
                if !error.is_empty() {
                    map.serialize_entry("error", error)?;
                }
                map.serialize_entry("fields", fields)?;
            }
        }
        map.end()
    }
}

/// Why a script's outputs were refused.
#[derive(Debug, PartialEq)]
pub(crate) enum OutputViolation {
    /// Output `index` breaks the contract.
    Bad { index: usize, reason: String },
    /// The outputs together are too large.
    TooLarge { size: usize, count: usize },
}

/// How much one message's outputs may hold.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutputCaps {
    /// Bytes of the packed outputs.
    pub(crate) bytes: usize,
    /// Outputs.
    pub(crate) count: usize,
    /// Fields of one output.
    pub(crate) fields: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_round_trip_through_json_with_type_first() {
        let output = Output {
            device_id: Some("a84041000181c061".into()),
            timestamp: None,
            kind: OutputKind::Telemetry {
                fields: serde_json::from_str(r#"{"BatV": 3.062, "Bat_status": 3}"#).unwrap(),
            },
        };
        let text = serde_json::to_string(&output).unwrap();
        assert_eq!(
            text,
            r#"{"type":"telemetry","device_id":"a84041000181c061","fields":{"BatV":3.062,"Bat_status":3}}"#
        );
        assert_eq!(serde_json::from_str::<Output>(&text).unwrap(), output);
        let alert: Output = serde_json::from_str(
            r#"{"type": "alert", "severity": "critical", "title": "t", "description": "d"}"#,
        )
        .unwrap();
        assert!(matches!(
            alert.kind,
            OutputKind::Alert {
                severity: Severity::Critical,
                ..
            }
        ));
    }
}
