//! WebSocket frames: what clients send (parsed with an error code for
//! every way a frame can be wrong) and what the server sends.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::auth::Credentials;
use crate::bus::history::Position;
use crate::bus::{AlertRaised, EventReported, Publication, StatusChange, json_text};
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
    /// Its credentials (empty strings count as none).
    pub fn credentials(&self) -> Credentials {
        Credentials {
            token: self.token.clone().filter(|t| !t.is_empty()),
            api_key: self.api_key.clone().filter(|k| !k.is_empty()),
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
    /// `command` frames: every state change of the covered devices'
    /// commands.
    Commands,
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
    /// Resume after these positions (every channel but telemetry): what
    /// was missed is sent first.
    #[serde(default)]
    pub since: Option<Since>,
    /// Whether the current snapshot of each device follows `subscribed`
    /// (true unless `false`).
    #[serde(default)]
    pub snapshot: Option<bool>,
}

/// A position a subscription resumes after, as the client sends it: the
/// tenant may be left out when the connection's tenant (or the one tenant
/// of the subscription's devices) is meant.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SincePosition {
    /// Whose history.
    #[serde(default)]
    pub tenant: Option<String>,
    /// The offset of the last entry seen.
    pub offset: u64,
    /// The epoch it belongs to.
    pub epoch: String,
}

/// `since`: one position, or one per tenant.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Since {
    /// One position.
    One(SincePosition),
    /// Several, each naming its tenant.
    Many(Vec<SincePosition>),
}

impl Since {
    /// The positions given.
    pub fn positions(&self) -> &[SincePosition] {
        match self {
            Since::One(one) => std::slice::from_ref(one),
            Since::Many(many) => many,
        }
    }
}

impl Subscribe {
    /// Whether the subscription is carried by its groups rather than by
    /// their members: telemetry, status, alerts or events of devices
    /// selected by `groups` alone. One count, and one channel per group
    /// and kind, whatever its size.
    pub fn carried_by_groups(&self) -> bool {
        self.channel != Channel::Commands
            && !self.groups.is_empty()
            && self.device_ids.is_empty()
            && self.device_types.is_empty()
            && self.locations.is_empty()
    }

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
    /// `devices.list`, `devices.status`, `telemetry.latest`, `device.command`,
    /// `scripts.list`, `stats`.
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

/// Milliseconds since the Unix epoch as RFC 3339 (UTC, milliseconds);
/// `None` outside the years 1970 to 9999, which RFC 3339 cannot write.
pub fn rfc3339(ms: i64) -> Option<String> {
    use std::fmt::Write as _;
    let ms = u64::try_from(ms).ok()?;
    let time = std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_millis(ms))?;
    let mut text = String::with_capacity(24);
    write!(text, "{}", humantime::format_rfc3339_millis(time)).ok()?;
    Some(text)
}

/// The compatibility telemetry frame: `{key: value, ..., "systime": RFC 3339}`;
/// `None` when `at_ms` has no RFC 3339 form.
pub fn compat_telemetry(fields: &Fields, at_ms: i64) -> Option<String> {
    let Some(systime) = rfc3339(at_ms) else {
        metrics::counter!("sluice_format_errors_total", "what" => "systime").increment(1);
        tracing::warn!(at_ms, "a report's time has no RFC 3339 form; frame skipped");
        return None;
    };
    let mut object = serde_json::Map::new();
    for (key, value) in fields.iter() {
        object.insert(key.to_owned(), value.clone());
    }
    object.insert("systime".into(), Value::String(systime));
    json_text(&Value::Object(object), "compat_telemetry")
}

/// The compatibility status frame: the seed's status JSON exactly, without
/// what sluice adds on its own channel (tenant, position).
pub fn compat_status(change: &StatusChange) -> Option<String> {
    let seed = StatusChange {
        tenant_id: String::new(),
        position: None,
        ..change.clone()
    };
    json_text(&seed, "compat_status")
}

/// A `device_data` frame of subscription `id`.
pub fn device_data(id: &str, device: &str, timestamp: i64, data: &Fields) -> Option<String> {
    Some(device_data_with(
        id,
        &device_data_tail(device, timestamp, data)?,
    ))
}

/// What every `device_data` frame of one report shares, after the
/// subscription id: `,"device":…,"timestamp":…,"data":{…}}`.
pub fn device_data_tail(device: &str, timestamp: i64, data: &Fields) -> Option<String> {
    let device = json_text(device, "device_data")?;
    let data = json_text(data, "device_data")?;
    Some(format!(
        r#","device":{device},"timestamp":{timestamp},"data":{data}}}"#
    ))
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
    tail: std::sync::OnceLock<Option<String>>,
    compat: std::sync::OnceLock<Option<String>>,
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
    pub fn device_data_tail(&self) -> Option<&str> {
        self.tail
            .get_or_init(|| match self.publication {
                Publication::Telemetry(t) => device_data_tail(&t.device_id, t.timestamp, &t.data),
                _ => None,
            })
            .as_deref()
    }

    /// The compatibility frame: a report (all its keys) or a status change.
    pub fn compat(&self) -> Option<&str> {
        self.compat
            .get_or_init(|| match self.publication {
                Publication::Telemetry(t) => compat_telemetry(&t.data, t.timestamp),
                Publication::Status(s) => compat_status(s),
                _ => None,
            })
            .as_deref()
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

/// `frame` with `position`, when there is one.
fn positioned(mut frame: Value, position: Option<&Position>) -> String {
    if let Some(position) = position {
        frame["position"] = json!(position);
    }
    frame.to_string()
}

/// A `status` frame of subscription `id` for a recorded change, with its
/// position.
pub fn status_change(id: &str, change: &StatusChange) -> String {
    positioned(
        json!({
            "type": "status",
            "id": id,
            "device": change.device_id,
            "device_name": change.device_name,
            "is_online": change.is_online,
            "timestamp": change.timestamp,
            "source": change.source.as_str(),
        }),
        change.position.as_ref(),
    )
}

/// An `alert` frame of subscription `id`, with its position.
pub fn alert(id: &str, alert: &AlertRaised) -> String {
    positioned(
        json!({
            "type": "alert",
            "id": id,
            "device": alert.device_id,
            "timestamp": alert.timestamp,
            "severity": alert.severity,
            "title": alert.title,
            "description": alert.description,
        }),
        alert.position.as_ref(),
    )
}

/// An `event` frame of subscription `id`, with its position.
pub fn event(id: &str, event: &EventReported) -> String {
    positioned(
        json!({
            "type": "event",
            "id": id,
            "device": event.device_id,
            "timestamp": event.timestamp,
            "name": event.name,
            "data": event.data,
        }),
        event.position.as_ref(),
    )
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
        let built = device_data("sub \"1\"", "d-1", 7, &data).unwrap();
        let expected = json!({"type": "device_data", "id": "sub \"1\"", "device": "d-1", "timestamp": 7, "data": data});
        assert_eq!(built, expected.to_string());
    }

    #[test]
    fn compat_frames_have_the_seed_shape() {
        let fields = Fields::new().with("temperature", 21.5);
        assert_eq!(
            compat_telemetry(&fields, 1_732_262_400_000).as_deref(),
            Some(r#"{"temperature":21.5,"systime":"2024-11-22T08:00:00.000Z"}"#)
        );
        // Past the year 9999 and before 1970 there is no RFC 3339 form.
        assert_eq!(compat_telemetry(&fields, 253_402_300_800_000), None);
        assert_eq!(compat_telemetry(&fields, i64::MAX), None);
        assert_eq!(compat_telemetry(&fields, -1), None);
        assert_eq!(select_keys(&fields, &["humidity".into()]), Fields::new());
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;

    /// Any JSON value, a few levels deep.
    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            ".{0,20}".prop_map(Value::String),
            prop_oneof![
                Just("subscribe"),
                Just("auth"),
                Just("call"),
                Just("ping"),
                Just("unsubscribe"),
                Just("telemetry"),
                Just("status"),
                Just("alerts"),
                Just("critical"),
            ]
            .prop_map(|s| Value::String(s.to_owned())),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::vec(
                    (
                        prop_oneof![
                            Just("type".to_owned()),
                            Just("id".to_owned()),
                            Just("channel".to_owned()),
                            Just("device_ids".to_owned()),
                            Just("keys".to_owned()),
                            Just("groups".to_owned()),
                            Just("alert_levels".to_owned()),
                            Just("token".to_owned()),
                            Just("args".to_owned()),
                            Just("request_id".to_owned()),
                            Just("service".to_owned()),
                            ".{0,8}",
                        ],
                        inner
                    ),
                    0..8
                )
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_text_frame_parses_or_is_an_error(text in ".{0,200}") {
            let _ = parse_client_frame(&text);
            let _ = parse_json::<CompatHello>(&text);
        }

        #[test]
        fn any_json_frame_parses_or_is_an_error(value in json()) {
            let text = value.to_string();
            if let Err(error) = parse_client_frame(&text) {
                prop_assert!(!error.code.is_empty());
                prop_assert!(error.frame().starts_with('{'), "an error frame is JSON");
            }
            let _ = parse_json::<CompatHello>(&text);
        }

        #[test]
        fn any_report_renders_or_is_skipped(timestamp in any::<i64>(), key in ".{0,10}", value in json()) {
            let fields = Fields::new().with(key, value);
            let _ = compat_telemetry(&fields, timestamp);
            let _ = device_data("s", "d", timestamp, &fields);
            let _ = rfc3339(timestamp);
        }
    }
}
