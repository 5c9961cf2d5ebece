//! WebSocket frames: what clients send (parsed with an error code for
//! every way a frame can be wrong) and what the server sends.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::auth::Credentials;
use crate::bus::{AlertRaised, EventReported, Publication, StatusChange};
use crate::script::{Fields, Severity};
use crate::status::DeviceStatus;

/// A frame the server refuses, as an `error` frame tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    /// A stable, machine-readable code.
    pub code: &'static str,
    /// A sentence naming the problem.
    pub message: String,
    /// The subscription or request it concerns, if any.
    pub id: Option<String>,
}

impl FrameError {
    /// An error with `code` and `message`.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        FrameError {
            code,
            message: message.into(),
            id: None,
        }
    }

    /// The same, about subscription or request `id`.
    pub fn about(mut self, id: &str) -> Self {
        self.id = Some(id.to_owned());
        self
    }

    /// The `error` frame.
    pub fn frame(&self) -> String {
        let mut frame = json!({"type": "error", "code": self.code, "message": self.message});
        if let Some(id) = &self.id {
            frame["id"] = Value::String(id.clone());
        }
        frame.to_string()
    }
}

/// The first frame of a compatibility endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompatHello {
    /// The device to follow.
    pub device_id: String,
    /// A JWT.
    #[serde(default)]
    pub token: Option<String>,
    /// An API key.
    #[serde(default)]
    pub api_key: Option<String>,
    /// Only these keys (the `keys` endpoint).
    #[serde(default)]
    pub keys: Option<Vec<String>>,
}

impl CompatHello {
    /// Its credentials.
    pub fn credentials(&self) -> Credentials {
        Credentials {
            token: self.token.clone(),
            api_key: self.api_key.clone(),
        }
    }
}

/// A channel of the native protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// `device_data` frames.
    Telemetry,
    /// `status` frames.
    Status,
    /// `alert` frames.
    Alerts,
    /// `event` frames.
    Events,
}

/// A `subscribe` frame. Filters combine with AND across kinds and OR
/// within a kind; no device filter at all means every device the client
/// may see.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscribe {
    /// The client's name for the subscription.
    pub id: String,
    /// What to receive.
    pub channel: Channel,
    /// These devices.
    #[serde(default)]
    pub device_ids: Vec<String>,
    /// Devices of these types (from the registry).
    #[serde(default)]
    pub device_types: Vec<String>,
    /// Devices at these locations.
    #[serde(default)]
    pub locations: Vec<String>,
    /// Devices in these groups.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Alerts of these severities (`alerts` channel).
    #[serde(default)]
    pub alert_levels: Vec<Severity>,
    /// Only these telemetry keys (`telemetry` channel).
    #[serde(default)]
    pub keys: Vec<String>,
}

impl Subscribe {
    /// Whether the device set comes from the registry (and follows it).
    pub fn selects_from_registry(&self) -> bool {
        !self.device_types.is_empty()
            || !self.locations.is_empty()
            || !self.groups.is_empty()
            || self.device_ids.is_empty()
    }
}

/// A `call` frame.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Call {
    /// The client's id for the request, echoed in the response.
    pub request_id: String,
    /// `devices.list`, `devices.status`, `telemetry.latest`, `scripts.list`, `stats`.
    pub service: String,
    /// Service arguments.
    #[serde(default)]
    pub args: Value,
}

/// A frame of the native protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    /// Credentials.
    Auth(Credentials),
    /// A new subscription.
    Subscribe(Box<Subscribe>),
    /// Ends subscription `id`.
    Unsubscribe(String),
    /// Keepalive.
    Ping,
    /// A service request.
    Call(Call),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFields {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    api_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnsubscribeFields {
    id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

/// Parses a text frame as JSON of type `T`, naming what is wrong.
pub fn parse_json<T: DeserializeOwned>(text: &str) -> Result<T, FrameError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| FrameError::new("bad_json", format!("the frame is not JSON: {e}")))?;
    from_value(value)
}

fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, FrameError> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner().to_string();
        if inner.starts_with("missing field") {
            FrameError::new("missing_field", inner)
        } else if path == "channel" {
            FrameError::new(
                "unknown_channel",
                format!("channel: {inner} (telemetry, status, alerts or events)"),
            )
        } else if inner.starts_with("unknown field") {
            FrameError::new("unknown_field", inner)
        } else {
            FrameError::new("bad_field", format!("{path}: {inner}"))
        }
    })
}

/// Parses a frame of the native protocol.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| FrameError::new("bad_json", format!("the frame is not JSON: {e}")))?;
    let Value::Object(mut object) = value else {
        return Err(FrameError::new(
            "bad_frame",
            "a frame is a JSON object with a \"type\"",
        ));
    };
    let kind = match object.remove("type") {
        Some(Value::String(kind)) => kind,
        Some(other) => {
            return Err(FrameError::new(
                "bad_field",
                format!("type must be a string, not {other}"),
            ));
        }
        None => return Err(FrameError::new("missing_field", "missing field `type`")),
    };
    let rest = Value::Object(object);
    Ok(match kind.as_str() {
        "auth" => {
            let fields: AuthFields = from_value(rest)?;
            ClientFrame::Auth(Credentials {
                token: fields.token,
                api_key: fields.api_key,
            })
        }
        "subscribe" => ClientFrame::Subscribe(Box::new(from_value(rest)?)),
        "unsubscribe" => ClientFrame::Unsubscribe(from_value::<UnsubscribeFields>(rest)?.id),
        "ping" => {
            from_value::<Empty>(rest)?;
            ClientFrame::Ping
        }
        "call" => ClientFrame::Call(from_value(rest)?),
        other => {
            return Err(FrameError::new(
                "unknown_type",
                format!(
                    "unknown frame type {other:?} (auth, subscribe, unsubscribe, ping or call)"
                ),
            ));
        }
    })
}

/// A report's fields, only `keys` when given.
pub fn select_keys(fields: &Fields, keys: &[String]) -> Fields {
    if keys.is_empty() {
        return fields.clone();
    }
    Fields::from_pairs(
        fields
            .iter()
            .filter(|(k, _)| keys.iter().any(|key| key == k))
            .map(|(k, v)| (k.to_owned(), v.clone()))
            .collect(),
    )
}

/// Milliseconds since the Unix epoch as RFC 3339 (UTC, milliseconds).
pub fn rfc3339(ms: i64) -> String {
    let ms = u64::try_from(ms).unwrap_or(0);
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

/// The compatibility telemetry frame: `{key: value, ..., "systime": RFC 3339}`.
pub fn compat_telemetry(fields: &Fields, at_ms: i64) -> String {
    let mut object = serde_json::Map::new();
    for (key, value) in fields.iter() {
        object.insert(key.to_owned(), json!(value));
    }
    object.insert("systime".into(), Value::String(rfc3339(at_ms)));
    Value::Object(object).to_string()
}

/// The compatibility status frame (the status channel's JSON).
pub fn compat_status(change: &StatusChange) -> String {
    serde_json::to_string(change).expect("status changes serialise")
}

/// A `device_data` frame of subscription `id`.
pub fn device_data(id: &str, device: &str, timestamp: i64, data: &Fields) -> String {
    device_data_with(id, &device_data_tail(device, timestamp, data))
}

/// What every `device_data` frame of one report shares, after the
/// subscription id: `,"device":…,"timestamp":…,"data":{…}}`.
pub fn device_data_tail(device: &str, timestamp: i64, data: &Fields) -> String {
    format!(
        r#","device":{},"timestamp":{timestamp},"data":{}}}"#,
        Value::String(device.to_owned()),
        serde_json::to_string(data).expect("fields serialise")
    )
}

/// A `device_data` frame of subscription `id` from a shared tail.
pub fn device_data_with(id: &str, tail: &str) -> String {
    let id = Value::String(id.to_owned()).to_string();
    let mut frame = String::with_capacity(32 + id.len() + tail.len());
    frame.push_str(r#"{"type":"device_data","id":"#);
    frame.push_str(&id);
    frame.push_str(tail);
    frame
}

/// A publication with the parts of its frames that every watcher shares,
/// rendered once on first use: fan-out to many clients serialises a
/// report once, not once per client.
#[derive(Debug)]
pub struct Rendered<'a> {
    /// The publication.
    pub publication: &'a Publication,
    tail: std::sync::OnceLock<String>,
    compat: std::sync::OnceLock<String>,
}

impl<'a> Rendered<'a> {
    /// Nothing rendered yet.
    pub fn new(publication: &'a Publication) -> Self {
        Rendered {
            publication,
            tail: std::sync::OnceLock::new(),
            compat: std::sync::OnceLock::new(),
        }
    }

    /// The `device_data` tail of a telemetry report (all its keys).
    pub fn device_data_tail(&self) -> &str {
        self.tail.get_or_init(|| match self.publication {
            Publication::Telemetry(t) => device_data_tail(&t.device_id, t.timestamp, &t.data),
            _ => String::new(),
        })
    }

    /// The compatibility frame: a report (all its keys) or a status change.
    pub fn compat(&self) -> &str {
        self.compat.get_or_init(|| match self.publication {
            Publication::Telemetry(t) => compat_telemetry(&t.data, t.timestamp),
            Publication::Status(s) => compat_status(s),
            _ => String::new(),
        })
    }
}

/// A `status` frame of subscription `id`; `status` is `None` when unknown.
pub fn status(id: &str, device: &str, name: &str, status: Option<DeviceStatus>) -> String {
    json!({
        "type": "status",
        "id": id,
        "device": device,
        "device_name": name,
        "is_online": status.map(|s| s.online),
        "timestamp": status.map(|s| s.since_ms),
        "source": status.map(|s| s.source.as_str()),
    })
    .to_string()
}

/// An `alert` frame of subscription `id`.
pub fn alert(id: &str, alert: &AlertRaised) -> String {
    json!({
        "type": "alert",
        "id": id,
        "device": alert.device_id,
        "timestamp": alert.timestamp,
        "severity": alert.severity,
        "title": alert.title,
        "description": alert.description,
    })
    .to_string()
}

/// An `event` frame of subscription `id`.
pub fn event(id: &str, event: &EventReported) -> String {
    json!({
        "type": "event",
        "id": id,
        "device": event.device_id,
        "timestamp": event.timestamp,
        "name": event.name,
        "data": event.data,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> &'static str {
        parse_client_frame(text).unwrap_err().code
    }

    #[test]
    fn every_malformed_frame_has_its_code() {
        assert_eq!(code("{"), "bad_json");
        assert_eq!(code("[1]"), "bad_frame");
        assert_eq!(code(r#"{"id":"x"}"#), "missing_field");
        assert_eq!(code(r#"{"type":"dance"}"#), "unknown_type");
        assert_eq!(code(r#"{"type":"subscribe","id":"s"}"#), "missing_field");
        assert_eq!(
            code(r#"{"type":"subscribe","id":"s","channel":"weather"}"#),
            "unknown_channel"
        );
        assert_eq!(
            code(r#"{"type":"subscribe","id":"s","channel":"status","colour":1}"#),
            "unknown_field"
        );
        assert_eq!(
            code(r#"{"type":"subscribe","id":"s","channel":"alerts","alert_levels":["loud"]}"#),
            "bad_field"
        );
        assert_eq!(code(r#"{"type":"unsubscribe"}"#), "missing_field");
    }

    #[test]
    fn frames_parse() {
        let frame = parse_client_frame(
            r#"{"type":"subscribe","id":"s1","channel":"telemetry","groups":["a"],"keys":["t"]}"#,
        )
        .unwrap();
        let ClientFrame::Subscribe(subscribe) = frame else {
            panic!("a subscribe frame")
        };
        assert_eq!(subscribe.channel, Channel::Telemetry);
        assert!(subscribe.selects_from_registry());
        assert_eq!(
            parse_client_frame(r#"{"type":"ping"}"#).unwrap(),
            ClientFrame::Ping
        );
    }

    #[test]
    fn shared_tails_make_the_same_frames() {
        let data = Fields::new().with("t", 1.5).with("s", "a\"b");
        let built = device_data("sub \"1\"", "d-1", 7, &data);
        let expected = json!({"type": "device_data", "id": "sub \"1\"", "device": "d-1", "timestamp": 7, "data": data});
        assert_eq!(built, expected.to_string());
    }

    #[test]
    fn compat_frames_have_the_seed_shape() {
        let fields = Fields::new().with("temperature", 21.5);
        assert_eq!(
            compat_telemetry(&fields, 1_732_262_400_000),
            r#"{"temperature":21.5,"systime":"2024-11-22T08:00:00.000Z"}"#
        );
        assert_eq!(select_keys(&fields, &["humidity".into()]), Fields::new());
    }
}
