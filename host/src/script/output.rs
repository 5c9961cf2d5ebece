//! What a script produces, as the rest of sluice sees it, and its checked
//! conversion from the values a script returned.

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

use super::bindings;
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
    /// Approximate bytes of all outputs.
    pub(crate) bytes: usize,
    /// Outputs.
    pub(crate) count: usize,
    /// Fields of one output.
    pub(crate) fields: usize,
}

/// Converts and checks what a script returned: keys and names not empty,
/// floats finite, nested JSON valid, and the whole within `caps`.
pub(crate) fn convert_outputs(
    raw: Vec<bindings::Output>,
    caps: OutputCaps,
) -> Result<Vec<Output>, OutputViolation> {
    let count = raw.len();
    let size: usize = raw.iter().map(raw_size).sum();
    if count > caps.count || size > caps.bytes {
        return Err(OutputViolation::TooLarge { size, count });
    }
    raw.into_iter()
        .enumerate()
        .map(|(index, output)| {
            convert(output, caps.fields).map_err(|reason| OutputViolation::Bad { index, reason })
        })
        .collect()
}

/// Approximate bytes an output occupies: text lengths plus eight per scalar.
fn raw_size(output: &bindings::Output) -> usize {
    fn fields_size(fields: &[bindings::Field]) -> usize {
        fields
            .iter()
            .map(|f| {
                f.key.len()
                    + match &f.value {
                        bindings::Value::Text(s) | bindings::Value::Json(s) => s.len(),
                        _ => 8,
                    }
            })
            .sum()
    }
    let base = 16 + output.device_id.as_ref().map_or(0, String::len);
    base + match &output.kind {
        bindings::OutputKind::Telemetry(fields) | bindings::OutputKind::Attributes(fields) => {
            fields_size(fields)
        }
        bindings::OutputKind::Event(event) => event.name.len() + fields_size(&event.fields),
        bindings::OutputKind::Alert(alert) => alert.title.len() + alert.description.len(),
        bindings::OutputKind::Status(_) => 1,
    }
}

fn convert(output: bindings::Output, max_fields: usize) -> Result<Output, String> {
    if let Some(device) = output.device_id.as_deref() {
        crate::config::check_name(device).map_err(|reason| format!("device_id: {reason}"))?;
    }
    let convert_fields = |fields: Vec<bindings::Field>| {
        if fields.len() > max_fields {
            return Err(format!(
                "{} fields; an output holds at most {max_fields}",
                fields.len()
            ));
        }
        convert_fields(fields)
    };
    let kind = match output.kind {
        bindings::OutputKind::Telemetry(fields) => OutputKind::Telemetry {
            fields: convert_fields(fields)?,
        },
        bindings::OutputKind::Attributes(fields) => OutputKind::Attributes {
            fields: convert_fields(fields)?,
        },
        bindings::OutputKind::Event(event) => {
            if event.name.is_empty() {
                return Err("event name is empty".into());
            }
            OutputKind::Event {
                name: event.name,
                fields: convert_fields(event.fields)?,
            }
        }
        bindings::OutputKind::Alert(alert) => OutputKind::Alert {
            severity: match alert.severity {
                bindings::Severity::Info => Severity::Info,
                bindings::Severity::Warning => Severity::Warning,
                bindings::Severity::Critical => Severity::Critical,
            },
            title: alert.title,
            description: alert.description,
        },
        bindings::OutputKind::Status(online) => OutputKind::Status { online },
    };
    Ok(Output {
        device_id: output.device_id,
        timestamp: output.timestamp,
        kind,
    })
}

fn convert_fields(fields: Vec<bindings::Field>) -> Result<Fields, String> {
    let pairs = fields
        .into_iter()
        .map(|field| {
            if field.key.is_empty() {
                return Err("a field has an empty key".to_owned());
            }
            let value = to_json(field.value)
                .map_err(|reason| format!("field {:?}: {reason}", field.key))?;
            Ok((field.key, value))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Fields::from_pairs(pairs))
}

/// A script's typed value as JSON.
pub(crate) fn to_json(value: bindings::Value) -> Result<serde_json::Value, String> {
    use serde_json::Value as Json;
    Ok(match value {
        bindings::Value::Null => Json::Null,
        bindings::Value::Boolean(b) => Json::Bool(b),
        bindings::Value::Integer(i) => Json::from(i),
        bindings::Value::Float(f) => Json::Number(
            serde_json::Number::from_f64(f).ok_or_else(|| format!("{f} is not a finite number"))?,
        ),
        bindings::Value::Text(s) => Json::String(s),
        bindings::Value::Json(text) => {
            serde_json::from_str(&text).map_err(|e| format!("nested JSON does not parse: {e}"))?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bindings::{Field, Value};

    fn telemetry(fields: Vec<Field>) -> bindings::Output {
        bindings::Output {
            device_id: None,
            timestamp: None,
            kind: bindings::OutputKind::Telemetry(fields),
        }
    }

    fn caps(bytes: usize, count: usize) -> OutputCaps {
        OutputCaps {
            bytes,
            count,
            fields: 100,
        }
    }

    fn field(key: &str, value: Value) -> Field {
        Field {
            key: key.into(),
            value,
        }
    }

    #[test]
    fn values_convert_to_json() {
        assert_eq!(to_json(Value::Null).unwrap(), serde_json::json!(null));
        assert_eq!(
            to_json(Value::Boolean(true)).unwrap(),
            serde_json::json!(true)
        );
        assert_eq!(to_json(Value::Integer(-7)).unwrap(), serde_json::json!(-7));
        assert_eq!(
            to_json(Value::Float(3.062)).unwrap(),
            serde_json::json!(3.062)
        );
        assert_eq!(
            to_json(Value::Text("on".into())).unwrap(),
            serde_json::json!("on")
        );
        assert_eq!(
            to_json(Value::Json(r#"{"a": [1, {"b": null}]}"#.into())).unwrap(),
            serde_json::json!({"a": [1, {"b": null}]})
        );
        assert_eq!(
            to_json(Value::Integer(i64::MIN)).unwrap(),
            serde_json::json!(i64::MIN)
        );
    }

    #[test]
    fn non_finite_floats_and_bad_json_are_refused() {
        assert!(
            to_json(Value::Float(f64::NAN))
                .unwrap_err()
                .contains("not a finite number")
        );
        assert!(to_json(Value::Float(f64::INFINITY)).is_err());
        assert!(
            to_json(Value::Json("{oops".into()))
                .unwrap_err()
                .contains("does not parse")
        );
    }

    #[test]
    fn bad_outputs_name_index_and_field() {
        let raw = vec![
            telemetry(vec![field("ok", Value::Integer(1))]),
            telemetry(vec![field("t", Value::Float(f64::NAN))]),
        ];
        assert_eq!(
            convert_outputs(raw, caps(1 << 20, 10)).unwrap_err(),
            OutputViolation::Bad {
                index: 1,
                reason: "field \"t\": NaN is not a finite number".into()
            }
        );
        let raw = vec![telemetry(vec![field("", Value::Null)])];
        assert!(matches!(
            convert_outputs(raw, caps(1 << 20, 10)),
            Err(OutputViolation::Bad { index: 0, .. })
        ));
    }

    #[test]
    fn size_and_count_caps_apply() {
        let big = vec![telemetry(vec![field(
            "blob",
            Value::Text("x".repeat(2000)),
        )])];
        assert!(matches!(
            convert_outputs(big, caps(1000, 10)),
            Err(OutputViolation::TooLarge { count: 1, .. })
        ));
        let many = (0..11).map(|_| telemetry(vec![])).collect();
        assert!(matches!(
            convert_outputs(many, caps(1 << 20, 10)),
            Err(OutputViolation::TooLarge { count: 11, .. })
        ));
    }

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

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;
    use bindings::{Field, Value};

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Boolean),
            any::<i64>().prop_map(Value::Integer),
            any::<f64>().prop_map(Value::Float),
            ".{0,16}".prop_map(Value::Text),
            prop_oneof![
                ".{0,16}",
                Just("[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]".to_owned()),
                Just("{\"a\": {\"b\": [1, 2, {\"c\": null}]}}".to_owned()),
                Just("1e999".to_owned()),
            ]
            .prop_map(Value::Json),
        ]
    }

    fn fields() -> impl Strategy<Value = Vec<Field>> {
        prop::collection::vec((".{0,6}", value()), 0..12).prop_map(|pairs| {
            pairs
                .into_iter()
                .map(|(key, value)| Field { key, value })
                .collect()
        })
    }

    fn output() -> impl Strategy<Value = bindings::Output> {
        let kind = prop_oneof![
            fields().prop_map(bindings::OutputKind::Telemetry),
            fields().prop_map(bindings::OutputKind::Attributes),
            (".{0,8}", fields()).prop_map(|(name, fields)| {
                bindings::OutputKind::Event(bindings::sluice::script::types::Event { name, fields })
            }),
            (".{0,8}", ".{0,8}").prop_map(|(title, description)| {
                bindings::OutputKind::Alert(bindings::sluice::script::types::Alert {
                    severity: bindings::Severity::Warning,
                    title,
                    description,
                })
            }),
            any::<bool>().prop_map(bindings::OutputKind::Status),
        ];
        (
            prop::option::of(".{0,10}"),
            prop::option::of(any::<i64>()),
            kind,
        )
            .prop_map(|(device_id, timestamp, kind)| bindings::Output {
                device_id,
                timestamp,
                kind,
            })
    }

    proptest! {
        #[test]
        fn any_outputs_convert_or_are_refused_within_the_caps(
            raw in prop::collection::vec(output(), 0..12),
            bytes in 0usize..4096,
            count in 0usize..12,
            max_fields in 0usize..12,
        ) {
            let caps = OutputCaps { bytes, count, fields: max_fields };
            if let Ok(outputs) = convert_outputs(raw, caps) {
                prop_assert!(outputs.len() <= count);
                for output in &outputs {
                    if let OutputKind::Telemetry { fields } | OutputKind::Attributes { fields } = &output.kind {
                        prop_assert!(fields.len() <= max_fields);
                    }
                    if let Some(device) = &output.device_id {
                        prop_assert!(crate::config::check_name(device).is_ok());
                    }
                    // Whatever converts can be written as JSON.
                    prop_assert!(serde_json::to_string(output).is_ok());
                }
            }
        }
    }
}
