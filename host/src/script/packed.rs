//! The packed encoding of the `sluice:script@0.2.1` world (specified in
//! `wit/script.wit` and `docs/script-abi.md`): messages and commands
//! written for a script, and its answers read back into the host's types with full
//! validation, straight from the script's memory.

use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::{DefaultHashBuilder, HashTable};
use serde_json::{Number, Value};

use super::command::{CommandCall, Downlink};
use super::fields::Fields;
use super::output::{Output, OutputCaps, OutputKind, OutputViolation, Severity};
use crate::message::{RawMessage, SourceKind};

/// Output kinds.
const TELEMETRY: u8 = 0;
const ATTRIBUTES: u8 = 1;
const EVENT: u8 = 2;
const ALERT: u8 = 3;
const STATUS: u8 = 4;
const REPLY: u8 = 5;

/// Output flags.
const HAS_DEVICE: u8 = 1;
const HAS_TIMESTAMP: u8 = 2;

/// Value tags.
const NULL: u8 = 0;
const BOOLEAN: u8 = 1;
const INTEGER: u8 = 2;
const FLOAT: u8 = 3;
const TEXT: u8 = 4;
const JSON: u8 = 5;

/// The smallest encodings: a status output (kind, flags, online) and a
/// field (a key length and a null; an empty key is refused later, with
/// its own error).
const MIN_OUTPUT: usize = 3;
const MIN_FIELD: usize = 5;

/// The source byte of a message.
fn source_byte(source: SourceKind) -> u8 {
    match source {
        SourceKind::Mqtt => 0,
        SourceKind::Kafka => 1,
        SourceKind::Http => 2,
        SourceKind::Internal => 3,
    }
}

/// Appends `len` as the `u32` length prefix. The host's inputs are far
/// below 4 GiB (payloads are capped by the sources, names at 128 bytes),
/// so a longer one is a bug, not input.
fn put_len(out: &mut Vec<u8>, len: usize) {
    let len = u32::try_from(len).expect("message parts are far below 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_len(out, bytes.len());
    out.extend_from_slice(bytes);
}

/// Appends one packed message.
pub(crate) fn put_message(out: &mut Vec<u8>, message: &RawMessage) {
    out.reserve(
        4 * 4
            + 9
            + message.device_id.len()
            + message.product.len()
            + message.topic.len()
            + message.payload.len(),
    );
    put_bytes(out, message.device_id.as_bytes());
    put_bytes(out, message.product.as_bytes());
    put_bytes(out, message.topic.as_bytes());
    out.extend_from_slice(&message.received_at.to_le_bytes());
    out.push(source_byte(message.source));
    put_bytes(out, &message.payload);
}

/// Appends packed messages: a count, then each.
pub(crate) fn put_messages(out: &mut Vec<u8>, messages: &[RawMessage]) {
    put_len(out, messages.len());
    for message in messages {
        put_message(out, message);
    }
}

/// Appends a packed command (what `encode` receives).
pub(crate) fn put_command(out: &mut Vec<u8>, command: &CommandCall) {
    put_bytes(out, command.id.as_bytes());
    put_bytes(out, command.device_id.as_bytes());
    put_bytes(out, command.product.as_bytes());
    put_bytes(out, command.name.as_bytes());
    put_bytes(out, command.params.as_bytes());
    out.extend_from_slice(&command.issued_at.to_le_bytes());
}

/// Downlink flags of the encoding.
const HAS_TOPIC: u8 = 1;
const HAS_FPORT: u8 = 2;
const CONFIRMED: u8 = 4;
const HAS_QOS: u8 = 8;
/// The most downlinks one command may become.
pub(crate) const MAX_DOWNLINKS: usize = 16;
/// The smallest encoded downlink: flags and an empty payload.
const MIN_DOWNLINK: usize = 5;

/// Decodes what `encode` returned, with full validation; `max_bytes` is
/// the product's `output` limit. The error says what is wrong, for
/// `bad_output` (or `output_too_large` when `Err(None)`).
pub(crate) fn read_downlinks(
    bytes: &[u8],
    max_bytes: usize,
) -> Result<Vec<Downlink>, Option<String>> {
    if bytes.len() > max_bytes {
        return Err(None);
    }
    let text = |m: Malformed| Some(m.to_string());
    let mut reader = Reader::new(bytes);
    let count = reader
        .count("the downlink count", MIN_DOWNLINK)
        .map_err(text)?;
    if count == 0 {
        return Err(Some("encode answered no downlink".into()));
    }
    if count > MAX_DOWNLINKS {
        return Err(Some(format!(
            "encode answered {count} downlinks; a command becomes at most {MAX_DOWNLINKS}"
        )));
    }
    let mut downlinks = Vec::with_capacity(count);
    for index in 0..count {
        let flags = reader.u8("downlink flags").map_err(text)?;
        if flags & !(HAS_TOPIC | HAS_FPORT | CONFIRMED | HAS_QOS) != 0 {
            return Err(text(reader.malformed(format!(
                "downlink #{index}: flags {flags:#04x} set unknown bits"
            ))));
        }
        let topic = if flags & HAS_TOPIC != 0 {
            let topic = reader.str("a downlink topic").map_err(text)?;
            if topic.is_empty() || topic.contains(['+', '#', '\0']) {
                return Err(Some(format!(
                    "downlink #{index}: topic {topic:?} is empty or holds a wildcard"
                )));
            }
            Some(topic.to_owned())
        } else {
            None
        };
        let fport = if flags & HAS_FPORT != 0 {
            match reader.u8("a downlink fPort").map_err(text)? {
                port @ 1..=223 => Some(port),
                port => {
                    return Err(Some(format!(
                        "downlink #{index}: fPort {port} is not within 1 to 223"
                    )));
                }
            }
        } else {
            None
        };
        let qos = if flags & HAS_QOS != 0 {
            match reader.u8("a downlink QoS").map_err(text)? {
                qos @ 0..=2 => Some(qos),
                qos => {
                    return Err(Some(format!(
                        "downlink #{index}: QoS {qos} is not 0, 1 or 2"
                    )));
                }
            }
        } else {
            None
        };
        let payload = reader.bytes("a downlink payload").map_err(text)?.to_vec();
        downlinks.push(Downlink {
            payload,
            topic,
            fport,
            confirmed: flags & CONFIRMED != 0,
            qos,
        });
    }
    if reader.remaining() > 0 {
        return Err(text(reader.malformed(format!(
            "{} bytes follow the last downlink",
            reader.remaining()
        ))));
    }
    Ok(downlinks)
}

/// Writes downlinks in the packed encoding, as an SDK would, for tests.
#[cfg(test)]
pub(crate) fn put_downlinks(out: &mut Vec<u8>, downlinks: &[Downlink]) {
    put_len(out, downlinks.len());
    for downlink in downlinks {
        let mut flags = 0;
        if downlink.topic.is_some() {
            flags |= HAS_TOPIC;
        }
        if downlink.fport.is_some() {
            flags |= HAS_FPORT;
        }
        if downlink.confirmed {
            flags |= CONFIRMED;
        }
        if downlink.qos.is_some() {
            flags |= HAS_QOS;
        }
        out.push(flags);
        if let Some(topic) = &downlink.topic {
            put_bytes(out, topic.as_bytes());
        }
        if let Some(port) = downlink.fport {
            out.push(port);
        }
        if let Some(qos) = downlink.qos {
            out.push(qos);
        }
        put_bytes(out, &downlink.payload);
    }
}

/// Appends a JSON object's members as packed `fields`, in document order
/// (what the host function `json-fields` answers): scalars as their own
/// values, integers beyond `s64` as floats, nested objects and arrays as
/// `json` values holding their text as written.
pub(crate) fn put_json_fields(out: &mut Vec<u8>, text: &[u8]) -> Result<(), String> {
    use serde_json::value::RawValue;

    let members: Vec<(JsonStr<'_>, &RawValue)> = serde_json::from_slice::<JsonObject<'_>>(text)
        .map_err(|e| e.to_string())?
        .0;
    put_len(out, members.len());
    for (key, raw) in members {
        let key = key.0;
        put_bytes(out, key.as_bytes());
        let json = raw.get();
        match json.as_bytes().first() {
            Some(b'{' | b'[') => {
                out.push(JSON);
                put_bytes(out, json.as_bytes());
            }
            Some(b'"') => {
                let text: JsonStr<'_> =
                    serde_json::from_str(json).map_err(|e| format!("member {key:?}: {e}"))?;
                out.push(TEXT);
                put_bytes(out, text.0.as_bytes());
            }
            Some(b't') => out.extend_from_slice(&[BOOLEAN, 1]),
            Some(b'f') => out.extend_from_slice(&[BOOLEAN, 0]),
            Some(b'n') => out.push(NULL),
            _ => {
                let number: Number =
                    serde_json::from_str(json).map_err(|e| format!("member {key:?}: {e}"))?;
                match number.as_i64() {
                    Some(i) => {
                        out.push(INTEGER);
                        out.extend_from_slice(&i.to_le_bytes());
                    }
                    None => {
                        out.push(FLOAT);
                        let f = number.as_f64().unwrap_or(f64::NAN);
                        out.extend_from_slice(&f.to_le_bytes());
                    }
                }
            }
        }
    }
    Ok(())
}

/// A JSON object's members in document order, values left as their text.
struct JsonObject<'a>(Vec<(JsonStr<'a>, &'a serde_json::value::RawValue)>);

/// A JSON string, borrowed from the document when it has no escapes.
struct JsonStr<'a>(std::borrow::Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for JsonStr<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;

        impl<'de> serde::de::Visitor<'de> for Text {
            type Value = JsonStr<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Self::Value, E> {
                Ok(JsonStr(std::borrow::Cow::Borrowed(text)))
            }

            fn visit_str<E>(self, text: &str) -> Result<Self::Value, E> {
                Ok(JsonStr(std::borrow::Cow::Owned(text.to_owned())))
            }
        }

        deserializer.deserialize_str(Text)
    }
}

impl<'de> serde::Deserialize<'de> for JsonObject<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;

        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = JsonObject<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(key) = map.next_key::<JsonStr<'de>>()? {
                    members.push((key, map.next_value()?));
                }
                Ok(JsonObject(members))
            }
        }

        deserializer.deserialize_map(Members)
    }
}

/// A script's answer that breaks the encoding; `at` is the byte offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Malformed {
    pub(crate) at: usize,
    pub(crate) reason: String,
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed answer at byte {}: {}", self.at, self.reason)
    }
}

/// Reads the primitives from a buffer, failing with the offset and what
/// was expected; never reads past the end.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, at: 0 }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn malformed(&self, reason: impl Into<String>) -> Malformed {
        Malformed {
            at: self.at,
            reason: reason.into(),
        }
    }

    fn take(&mut self, len: usize, what: &str) -> Result<&'a [u8], Malformed> {
        if len > self.remaining() {
            return Err(self.malformed(format!(
                "{what} needs {len} bytes, {} are left",
                self.remaining()
            )));
        }
        let bytes = &self.bytes[self.at..self.at + len];
        self.at += len;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], Malformed> {
        let bytes = self.take(N, what)?;
        Ok(bytes.try_into().expect("take returned N bytes"))
    }

    fn u8(&mut self, what: &str) -> Result<u8, Malformed> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<usize, Malformed> {
        let n = u32::from_le_bytes(self.array(what)?);
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn s64(&mut self, what: &str) -> Result<i64, Malformed> {
        Ok(i64::from_le_bytes(self.array(what)?))
    }

    fn f64(&mut self, what: &str) -> Result<f64, Malformed> {
        Ok(f64::from_le_bytes(self.array(what)?))
    }

    /// The bytes of a length-prefixed `str` or `bytes`.
    fn bytes(&mut self, what: &str) -> Result<&'a [u8], Malformed> {
        let len = self.u32(what)?;
        self.take(len, what)
    }

    /// A length-prefixed UTF-8 string.
    fn str(&mut self, what: &str) -> Result<&'a str, Malformed> {
        let start = self.at;
        let bytes = self.bytes(what)?;
        std::str::from_utf8(bytes).map_err(|e| Malformed {
            at: start,
            reason: format!("{what} is not UTF-8: {e}"),
        })
    }

    /// A count of items of at least `min_size` bytes each: a count the
    /// rest of the buffer cannot hold is refused before anything is
    /// allocated for it.
    fn count(&mut self, what: &str, min_size: usize) -> Result<usize, Malformed> {
        let count = self.u32(what)?;
        if count > self.remaining() / min_size {
            return Err(self.malformed(format!(
                "{what} is {count}, more than the {} bytes left can hold",
                self.remaining()
            )));
        }
        Ok(count)
    }
}

/// Field keys already seen by one script instance, so a repeated key costs
/// a lookup and no allocation. Bounded: at most [`KeyInterner::KEYS`] keys
/// of at most [`KeyInterner::KEY_BYTES`] bytes are kept; others are
/// allocated each time.
#[derive(Default)]
pub(crate) struct KeyInterner {
    table: HashTable<Arc<str>>,
    hasher: DefaultHashBuilder,
}

impl std::fmt::Debug for KeyInterner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyInterner")
            .field("keys", &self.table.len())
            .finish()
    }
}

impl KeyInterner {
    /// Keys kept per instance.
    pub(crate) const KEYS: usize = 4096;
    /// The longest key kept.
    pub(crate) const KEY_BYTES: usize = 64;

    /// The key with these bytes, checked to be UTF-8 the first time.
    fn key(&mut self, bytes: &[u8]) -> Result<Arc<str>, std::str::Utf8Error> {
        if bytes.len() > Self::KEY_BYTES {
            return std::str::from_utf8(bytes).map(Arc::from);
        }
        let hash = self.hasher.hash_one(bytes);
        if let Some(key) = self.table.find(hash, |k| k.as_bytes() == bytes) {
            return Ok(key.clone());
        }
        let key: Arc<str> = Arc::from(std::str::from_utf8(bytes)?);
        if self.table.len() < Self::KEYS {
            let hasher = &self.hasher;
            self.table
                .insert_unique(hash, key.clone(), |k| hasher.hash_one(k.as_bytes()));
        }
        Ok(key)
    }

    /// How many keys are kept.
    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }
}

/// What one message's answer holds.
pub(crate) type Answer = Result<Vec<Output>, Rejection>;

/// A script's own refusal of a message (`parse` returned its error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub(crate) code: String,
    pub(crate) message: String,
}

/// Decodes what `parse` returned on success: packed outputs, and nothing
/// after them.
pub(crate) fn read_outputs(
    bytes: &[u8],
    caps: OutputCaps,
    keys: &mut KeyInterner,
) -> Result<Vec<Output>, OutputViolation> {
    let mut reader = Reader::new(bytes);
    let outputs = OutputsReader { caps, keys }.read(&mut reader, bytes.len())?;
    if reader.remaining() > 0 {
        return Err(OutputViolation::Bad {
            index: outputs.len(),
            reason: reader
                .malformed(format!(
                    "{} bytes follow the last output",
                    reader.remaining()
                ))
                .to_string(),
        });
    }
    Ok(outputs)
}

/// Decodes what `parse-batch` returned: one answer per message, each
/// checked on its own, so one bad answer fails only its message. `Err`
/// when the buffer as a whole is malformed (its count or a length).
pub(crate) fn read_results(
    bytes: &[u8],
    messages: usize,
    caps: OutputCaps,
    keys: &mut KeyInterner,
) -> Result<Vec<Result<Answer, OutputViolation>>, Malformed> {
    let mut reader = Reader::new(bytes);
    let count = reader.count("the result count", 5)?;
    if count != messages {
        return Err(reader.malformed(format!("{count} results for {messages} messages")));
    }
    let mut results = Vec::with_capacity(count);
    for _ in 0..count {
        let tag = reader.u8("a result tag")?;
        let start = reader.at;
        let body = reader.bytes("a result")?;
        let result = match tag {
            0 => read_outputs(body, caps, keys).map(Ok),
            1 => {
                let mut inner = Reader::new(body);
                let rejection = (|| {
                    let code = inner.str("an error code")?.to_owned();
                    let message = inner.str("an error message")?.to_owned();
                    if inner.remaining() > 0 {
                        return Err(inner.malformed("bytes follow the error message"));
                    }
                    Ok(Rejection { code, message })
                })();
                rejection.map(Err).map_err(|m| OutputViolation::Bad {
                    index: 0,
                    reason: Malformed {
                        at: start + 4 + m.at,
                        reason: m.reason,
                    }
                    .to_string(),
                })
            }
            other => Err(OutputViolation::Bad {
                index: 0,
                reason: Malformed {
                    at: start - 1,
                    reason: format!("result tag {other} is neither 0 (outputs) nor 1 (error)"),
                }
                .to_string(),
            }),
        };
        results.push(result);
    }
    if reader.remaining() > 0 {
        return Err(reader.malformed(format!(
            "{} bytes follow the last result",
            reader.remaining()
        )));
    }
    Ok(results)
}

/// Reads outputs within the caps.
struct OutputsReader<'k> {
    caps: OutputCaps,
    keys: &'k mut KeyInterner,
}

impl OutputsReader<'_> {
    /// Reads a count and that many outputs; `size` is the encoded size of
    /// the answer, checked against the byte cap before anything is read.
    fn read(
        mut self,
        reader: &mut Reader<'_>,
        size: usize,
    ) -> Result<Vec<Output>, OutputViolation> {
        let bad = |index: usize, m: Malformed| OutputViolation::Bad {
            index,
            reason: m.to_string(),
        };
        let count = reader.u32("the output count").map_err(|m| bad(0, m))?;
        if size > self.caps.bytes || count > self.caps.count {
            return Err(OutputViolation::TooLarge { size, count });
        }
        if count > reader.remaining() / MIN_OUTPUT {
            return Err(bad(
                0,
                reader.malformed(format!(
                    "the output count is {count}, more than the {} bytes left can hold",
                    reader.remaining()
                )),
            ));
        }
        let mut outputs = Vec::with_capacity(count);
        for index in 0..count {
            let output = self
                .output(reader)
                .map_err(|reason| OutputViolation::Bad { index, reason })?;
            outputs.push(output);
        }
        Ok(outputs)
    }

    /// One output; the error is the reason, for [`OutputViolation::Bad`].
    fn output(&mut self, reader: &mut Reader<'_>) -> Result<Output, String> {
        let text = |m: Malformed| m.to_string();
        let start = reader.at;
        let kind = reader.u8("an output kind").map_err(text)?;
        let flags = reader.u8("output flags").map_err(text)?;
        if flags & !(HAS_DEVICE | HAS_TIMESTAMP) != 0 {
            return Err(text(
                reader.malformed(format!("output flags {flags:#04x} set unknown bits")),
            ));
        }
        let device_id = if flags & HAS_DEVICE != 0 {
            let device = reader.str("the device id").map_err(text)?;
            crate::config::check_name(device).map_err(|reason| format!("device_id: {reason}"))?;
            Some(device.to_owned())
        } else {
            None
        };
        let timestamp = if flags & HAS_TIMESTAMP != 0 {
            Some(reader.s64("the timestamp").map_err(text)?)
        } else {
            None
        };
        let kind = match kind {
            TELEMETRY => OutputKind::Telemetry {
                fields: self.fields(reader)?,
            },
            ATTRIBUTES => OutputKind::Attributes {
                fields: self.fields(reader)?,
            },
            EVENT => {
                let name = reader.str("the event name").map_err(text)?;
                if name.is_empty() {
                    return Err("event name is empty".into());
                }
                let name = name.to_owned();
                OutputKind::Event {
                    name,
                    fields: self.fields(reader)?,
                }
            }
            ALERT => {
                let severity = match reader.u8("the alert severity").map_err(text)? {
                    0 => Severity::Info,
                    1 => Severity::Warning,
                    2 => Severity::Critical,
                    other => {
                        return Err(format!(
                            "alert severity {other} is not 0 (info), 1 (warning) or 2 (critical)"
                        ));
                    }
                };
                let title = reader.str("the alert title").map_err(text)?.to_owned();
                let description = reader
                    .str("the alert description")
                    .map_err(text)?
                    .to_owned();
                OutputKind::Alert {
                    severity,
                    title,
                    description,
                }
            }
            STATUS => match reader.u8("the status").map_err(text)? {
                0 => OutputKind::Status { online: false },
                1 => OutputKind::Status { online: true },
                other => return Err(format!("status {other} is neither 0 nor 1")),
            },
            REPLY => {
                let command_id = reader.str("the command id").map_err(text)?;
                if command_id.is_empty() {
                    return Err("reply command id is empty".into());
                }
                let command_id = command_id.to_owned();
                let ok = match reader.u8("the reply outcome").map_err(text)? {
                    0 => false,
                    1 => true,
                    other => return Err(format!("reply outcome {other} is neither 0 nor 1")),
                };
                let error = reader.str("the reply error").map_err(text)?.to_owned();
                OutputKind::Reply {
                    command_id,
                    ok,
                    error,
                    fields: self.fields(reader)?,
                }
            }
            other => {
                return Err(text(Malformed {
                    at: start,
                    reason: format!("output kind {other} is not one of 0 to 5"),
                }));
            }
        };
        Ok(Output {
            device_id,
            timestamp,
            kind,
        })
    }

    fn fields(&mut self, reader: &mut Reader<'_>) -> Result<Fields, String> {
        let text = |m: Malformed| m.to_string();
        let count = reader.count("the field count", MIN_FIELD).map_err(text)?;
        if count > self.caps.fields {
            return Err(format!(
                "{count} fields; an output holds at most {}",
                self.caps.fields
            ));
        }
        let mut fields = Fields::with_capacity(count);
        for _ in 0..count {
            let start = reader.at;
            let key_bytes = reader.bytes("a field key").map_err(text)?;
            if key_bytes.is_empty() {
                return Err("a field has an empty key".into());
            }
            let key = self.keys.key(key_bytes).map_err(|e| {
                text(Malformed {
                    at: start,
                    reason: format!("a field key is not UTF-8: {e}"),
                })
            })?;
            let value = value(reader).map_err(|reason| format!("field {key:?}: {reason}"))?;
            fields.insert(key, value);
        }
        Ok(fields)
    }
}

/// One packed value as JSON.
fn value(reader: &mut Reader<'_>) -> Result<Value, String> {
    let text = |m: Malformed| m.to_string();
    Ok(match reader.u8("a value tag").map_err(text)? {
        NULL => Value::Null,
        BOOLEAN => match reader.u8("a boolean").map_err(text)? {
            0 => Value::Bool(false),
            1 => Value::Bool(true),
            other => return Err(format!("boolean {other} is neither 0 nor 1")),
        },
        INTEGER => Value::from(reader.s64("an integer").map_err(text)?),
        FLOAT => {
            let f = reader.f64("a float").map_err(text)?;
            Value::Number(Number::from_f64(f).ok_or_else(|| format!("{f} is not a finite number"))?)
        }
        TEXT => Value::String(reader.str("a text value").map_err(text)?.to_owned()),
        JSON => {
            let json = reader.str("a JSON value").map_err(text)?;
            serde_json::from_str(json).map_err(|e| format!("nested JSON does not parse: {e}"))?
        }
        other => {
            return Err(text(Malformed {
                at: reader.at - 1,
                reason: format!("value tag {other} is not one of 0 to 5"),
            }));
        }
    })
}

/// Writes outputs in the packed encoding, as an SDK would, for the tests
/// of the decoder.
#[cfg(test)]
pub(crate) fn put_outputs(out: &mut Vec<u8>, outputs: &[Output]) {
    fn put_str(out: &mut Vec<u8>, s: &str) {
        put_bytes(out, s.as_bytes());
    }
    fn put_fields(out: &mut Vec<u8>, fields: &Fields) {
        put_len(out, fields.len());
        for (key, value) in fields.iter() {
            put_str(out, key);
            match value {
                Value::Null => out.push(NULL),
                Value::Bool(b) => out.extend_from_slice(&[BOOLEAN, u8::from(*b)]),
                Value::Number(n) => match n.as_i64() {
                    Some(i) => {
                        out.push(INTEGER);
                        out.extend_from_slice(&i.to_le_bytes());
                    }
                    None => {
                        out.push(FLOAT);
                        out.extend_from_slice(&n.as_f64().unwrap_or(0.0).to_le_bytes());
                    }
                },
                Value::String(s) => {
                    out.push(TEXT);
                    put_str(out, s);
                }
                nested => {
                    out.push(JSON);
                    put_str(out, &nested.to_string());
                }
            }
        }
    }
    put_len(out, outputs.len());
    for output in outputs {
        let kind = match output.kind {
            OutputKind::Telemetry { .. } => TELEMETRY,
            OutputKind::Attributes { .. } => ATTRIBUTES,
            OutputKind::Event { .. } => EVENT,
            OutputKind::Alert { .. } => ALERT,
            OutputKind::Status { .. } => STATUS,
            OutputKind::Reply { .. } => REPLY,
        };
        let flags = if output.device_id.is_some() {
            HAS_DEVICE
        } else {
            0
        } | if output.timestamp.is_some() {
            HAS_TIMESTAMP
        } else {
            0
        };
        out.extend_from_slice(&[kind, flags]);
        if let Some(device) = &output.device_id {
            put_str(out, device);
        }
        if let Some(timestamp) = output.timestamp {
            out.extend_from_slice(&timestamp.to_le_bytes());
        }
        match &output.kind {
            OutputKind::Telemetry { fields } | OutputKind::Attributes { fields } => {
                put_fields(out, fields);
            }
            OutputKind::Event { name, fields } => {
                put_str(out, name);
                put_fields(out, fields);
            }
            OutputKind::Alert {
                severity,
                title,
                description,
            } => {
                out.push(*severity as u8);
                put_str(out, title);
                put_str(out, description);
            }
            OutputKind::Status { online } => out.push(u8::from(*online)),
            OutputKind::Reply {
                command_id,
                ok,
                error,
                fields,
            } => {
                put_str(out, command_id);
                out.push(u8::from(*ok));
                put_str(out, error);
                put_fields(out, fields);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn caps(bytes: usize, count: usize) -> OutputCaps {
        OutputCaps {
            bytes,
            count,
            fields: 100,
        }
    }

    fn telemetry(fields: Fields) -> Output {
        Output {
            device_id: None,
            timestamp: None,
            kind: OutputKind::Telemetry { fields },
        }
    }

    fn packed(outputs: &[Output]) -> Vec<u8> {
        let mut bytes = Vec::new();
        put_outputs(&mut bytes, outputs);
        bytes
    }

    fn read(bytes: &[u8]) -> Result<Vec<Output>, OutputViolation> {
        read_outputs(bytes, caps(1 << 20, 1000), &mut KeyInterner::default())
    }

    /// One telemetry output whose only field has the value `value` (tag and bytes).
    fn one_value(value: &[u8]) -> Vec<u8> {
        let mut bytes = vec![1, 0, 0, 0, TELEMETRY, 0, 1, 0, 0, 0, 1, 0, 0, 0, b'v'];
        bytes.extend_from_slice(value);
        bytes
    }

    #[test]
    fn outputs_of_every_kind_round_trip() {
        let outputs = vec![
            Output {
                device_id: Some("sub-1".into()),
                timestamp: Some(1_700_000_000_000),
                kind: OutputKind::Telemetry {
                    fields: Fields::new()
                        .with("t", 21.5)
                        .with("n", -3)
                        .with("s", "ok")
                        .with("b", true)
                        .with("z", serde_json::Value::Null)
                        .with("o", json!({"a": [1, {"b": null}]})),
                },
            },
            Output {
                device_id: None,
                timestamp: None,
                kind: OutputKind::Attributes {
                    fields: Fields::new().with("fw", "1.4.2"),
                },
            },
            Output {
                device_id: None,
                timestamp: Some(5),
                kind: OutputKind::Event {
                    name: "opened".into(),
                    fields: Fields::new().with("door", 2),
                },
            },
            Output {
                device_id: None,
                timestamp: None,
                kind: OutputKind::Alert {
                    severity: Severity::Critical,
                    title: "Hot".into(),
                    description: "82 °C".into(),
                },
            },
            Output {
                device_id: None,
                timestamp: None,
                kind: OutputKind::Status { online: false },
            },
        ];
        assert_eq!(read(&packed(&outputs)).unwrap(), outputs);
    }

    #[test]
    fn the_example_of_the_abi_document_decodes() {
        // docs/script-abi.md, "An example".
        let bytes = hex::decode(
            "01000000 00 02 0068e5cf8b010000 01000000 0b00000074656d7065726174757265 030000000000803540"
                .replace(' ', ""),
        )
        .unwrap();
        let outputs = read(&bytes).unwrap();
        assert_eq!(outputs[0].timestamp, Some(1_700_000_000_000));
        assert_eq!(
            outputs[0].kind,
            OutputKind::Telemetry {
                fields: Fields::new().with("temperature", 21.5)
            }
        );
    }

    #[test]
    fn repeated_keys_keep_the_last_value_at_the_first_place() {
        let mut bytes = vec![1, 0, 0, 0, TELEMETRY, 0, 3, 0, 0, 0];
        for (key, value) in [(b'a', 1u8), (b'b', 2), (b'a', 3)] {
            bytes.extend_from_slice(&[1, 0, 0, 0, key, INTEGER]);
            bytes.extend_from_slice(&i64::from(value).to_le_bytes());
        }
        let outputs = read(&bytes).unwrap();
        let OutputKind::Telemetry { fields } = &outputs[0].kind else {
            panic!("telemetry")
        };
        assert_eq!(serde_json::to_string(fields).unwrap(), r#"{"a":3,"b":2}"#);
    }

    #[test]
    fn bad_values_name_the_output_and_field() {
        let nan = one_value(&[&[FLOAT][..], &f64::NAN.to_le_bytes()].concat());
        assert_eq!(
            read(&nan).unwrap_err(),
            OutputViolation::Bad {
                index: 0,
                reason: "field \"v\": NaN is not a finite number".into()
            }
        );
        let json = one_value(&[&[JSON, 5, 0, 0, 0][..], b"{oops"].concat());
        let OutputViolation::Bad { reason, .. } = read(&json).unwrap_err() else {
            panic!("bad")
        };
        assert!(reason.contains("nested JSON does not parse"), "{reason}");
        let boolean = one_value(&[BOOLEAN, 2]);
        assert!(matches!(read(&boolean), Err(OutputViolation::Bad { .. })));
        let tag = one_value(&[9]);
        let OutputViolation::Bad { reason, .. } = read(&tag).unwrap_err() else {
            panic!("bad")
        };
        assert!(reason.contains("value tag 9"), "{reason}");
        assert!(reason.contains("at byte 15"), "{reason}");
    }

    #[test]
    fn structure_errors_are_refused_with_the_offset() {
        let good = packed(&[telemetry(Fields::new().with("ok", true))]);
        assert!(read(&good).is_ok());
        // Cut anywhere: refused, never a panic.
        for len in 0..good.len() {
            assert!(
                matches!(read(&good[..len]), Err(OutputViolation::Bad { .. })),
                "{len}"
            );
        }
        // Trailing bytes.
        let mut long = good.clone();
        long.push(0);
        let OutputViolation::Bad { reason, .. } = read(&long).unwrap_err() else {
            panic!("bad")
        };
        assert!(
            reason.contains("1 bytes follow the last output"),
            "{reason}"
        );
        // Unknown flag bits, an unknown kind, an empty key, invalid UTF-8.
        let mut flags = good.clone();
        flags[5] = 4;
        assert!(matches!(read(&flags), Err(OutputViolation::Bad { .. })));
        let mut kind = good.clone();
        kind[4] = 7;
        assert!(matches!(
            read(&kind),
            Err(OutputViolation::Bad { index: 0, .. })
        ));
        let empty_key = [1, 0, 0, 0, TELEMETRY, 0, 1, 0, 0, 0, 0, 0, 0, 0, NULL];
        let OutputViolation::Bad { reason, .. } = read(&empty_key).unwrap_err() else {
            panic!("bad")
        };
        assert_eq!(reason, "a field has an empty key");
        let mut utf8 = good.clone();
        utf8[14] = 0xff;
        let OutputViolation::Bad { reason, .. } = read(&utf8).unwrap_err() else {
            panic!("bad")
        };
        assert!(reason.contains("not UTF-8"), "{reason}");
    }

    #[test]
    fn counts_the_buffer_cannot_hold_are_refused_before_allocating() {
        // Four billion outputs in four bytes.
        let huge = u32::MAX.to_le_bytes();
        assert!(matches!(
            read_outputs(
                &huge,
                caps(1 << 20, usize::MAX),
                &mut KeyInterner::default()
            ),
            Err(OutputViolation::Bad { .. })
        ));
        // A field count of four billion.
        let fields = [1, 0, 0, 0, TELEMETRY, 0, 0xff, 0xff, 0xff, 0xff];
        let OutputViolation::Bad { reason, .. } = read(&fields).unwrap_err() else {
            panic!("bad")
        };
        assert!(reason.contains("the field count is 4294967295"), "{reason}");
    }

    #[test]
    fn size_count_and_field_caps_apply() {
        let big = packed(&[telemetry(Fields::new().with("blob", "x".repeat(2000)))]);
        assert!(matches!(
            read_outputs(&big, caps(1000, 10), &mut KeyInterner::default()),
            Err(OutputViolation::TooLarge { count: 1, .. })
        ));
        let many = packed(&vec![telemetry(Fields::new()); 11]);
        assert!(matches!(
            read_outputs(&many, caps(1 << 20, 10), &mut KeyInterner::default()),
            Err(OutputViolation::TooLarge { count: 11, .. })
        ));
        let wide: Fields = (0..101).map(|i| (format!("k{i}"), json!(i))).collect();
        let OutputViolation::Bad { reason, .. } = read(&packed(&[telemetry(wide)])).unwrap_err()
        else {
            panic!("bad")
        };
        assert_eq!(reason, "101 fields; an output holds at most 100");
    }

    #[test]
    fn device_ids_must_be_names() {
        let output = Output {
            device_id: Some("a/b".into()),
            timestamp: None,
            kind: OutputKind::Status { online: true },
        };
        let OutputViolation::Bad { reason, .. } = read(&packed(&[output])).unwrap_err() else {
            panic!("bad")
        };
        assert!(reason.starts_with("device_id: "), "{reason}");
    }

    #[test]
    fn keys_are_interned_up_to_the_bounds() {
        let mut keys = KeyInterner::default();
        let bytes = packed(&[telemetry(Fields::new().with("temperature", 1))]);
        let first = read_outputs(&bytes, caps(1 << 20, 10), &mut keys).unwrap();
        let second = read_outputs(&bytes, caps(1 << 20, 10), &mut keys).unwrap();
        let key = |outputs: &[Output]| match &outputs[0].kind {
            OutputKind::Telemetry { fields } => fields.entries().next().unwrap().0.clone(),
            _ => unreachable!(),
        };
        assert!(Arc::ptr_eq(&key(&first), &key(&second)));
        assert_eq!(keys.len(), 1);
        for i in 0..KeyInterner::KEYS + 10 {
            keys.key(format!("k{i}").as_bytes()).unwrap();
        }
        assert_eq!(keys.len(), KeyInterner::KEYS);
        keys.key(&[b'x'; KeyInterner::KEY_BYTES + 1]).unwrap();
        assert_eq!(keys.len(), KeyInterner::KEYS);
    }

    #[test]
    fn batch_results_fail_one_message_at_a_time() {
        let mut bytes = 3u32.to_le_bytes().to_vec();
        // 0: good outputs; 1: a refusal; 2: outputs with a NaN.
        let good = packed(&[telemetry(Fields::new().with("ok", true))]);
        bytes.push(0);
        bytes.extend_from_slice(&(good.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&good);
        let refusal = [&[5, 0, 0, 0][..], b"no-fp", &[3, 0, 0, 0], b"why"].concat();
        bytes.push(1);
        bytes.extend_from_slice(&(refusal.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&refusal);
        let nan = one_value(&[&[FLOAT][..], &f64::NAN.to_le_bytes()].concat());
        bytes.push(0);
        bytes.extend_from_slice(&(nan.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&nan);
        let mut keys = KeyInterner::default();
        let results = read_results(&bytes, 3, caps(1 << 20, 10), &mut keys).unwrap();
        assert!(matches!(&results[0], Ok(Ok(outputs)) if outputs.len() == 1));
        assert_eq!(
            results[1],
            Ok(Err(Rejection {
                code: "no-fp".into(),
                message: "why".into()
            }))
        );
        assert!(matches!(results[2], Err(OutputViolation::Bad { .. })));
        // A count that does not match the messages fails the whole batch.
        let error = read_results(&bytes, 2, caps(1 << 20, 10), &mut keys).unwrap_err();
        assert!(error.reason.contains("3 results for 2 messages"), "{error}");
    }

    #[test]
    fn messages_are_written_in_the_documented_layout() {
        let message = RawMessage {
            device_id: "d".into(),
            product: "p".into(),
            topic: "t/1".into(),
            payload: vec![0xaa, 0xbb],
            received_at: 7,
            source: SourceKind::Http,
        };
        let mut bytes = Vec::new();
        put_message(&mut bytes, &message);
        let expected = [
            &[1, 0, 0, 0, b'd'][..],
            &[1, 0, 0, 0, b'p'],
            &[3, 0, 0, 0, b't', b'/', b'1'],
            &7i64.to_le_bytes(),
            &[2],
            &[2, 0, 0, 0, 0xaa, 0xbb],
        ]
        .concat();
        assert_eq!(bytes, expected);
    }

    #[test]
    fn json_objects_become_packed_fields_in_document_order() {
        let mut bytes = 1u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[TELEMETRY, 0]);
        put_json_fields(
            &mut bytes,
            br#"{"z": 1, "big": 18446744073709551615, "f": 0.5, "s": "a\"b", "n": null,
                 "t": true, "o": {"k": [1, 2]}, "a": [true]}"#,
        )
        .unwrap();
        let outputs = read(&bytes).unwrap();
        let OutputKind::Telemetry { fields } = &outputs[0].kind else {
            panic!("telemetry")
        };
        assert_eq!(
            serde_json::to_value(fields).unwrap(),
            json!({"z": 1, "big": 18446744073709551615.0, "f": 0.5, "s": "a\"b", "n": null,
                   "t": true, "o": {"k": [1, 2]}, "a": [true]})
        );
        let keys: Vec<&str> = fields.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["z", "big", "f", "s", "n", "t", "o", "a"]);
        let error = put_json_fields(&mut Vec::new(), b"[1, 2]").unwrap_err();
        assert!(error.contains("expected a JSON object"), "{error}");
        assert!(put_json_fields(&mut Vec::new(), b"{\"a\": ").is_err());
    }
}

#[cfg(test)]
mod properties {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    use proptest::prelude::*;

    use super::*;

    /// Counts the bytes this thread allocates, so a property can bound what
    /// decoding one answer allocates.
    struct Counting;

    thread_local! {
        static ALLOCATED: Cell<usize> = const { Cell::new(0) };
    }

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            ALLOCATED.with(|a| a.set(a.get() + layout.size()));
            unsafe { System.alloc(layout) }
        }

        unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
            unsafe { System.dealloc(block, layout) }
        }

        unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            ALLOCATED.with(|a| a.set(a.get() + new_size));
            unsafe { System.realloc(block, layout, new_size) }
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    fn allocated_by<T>(f: impl FnOnce() -> T) -> (T, usize) {
        let before = ALLOCATED.with(Cell::get);
        let result = f();
        (result, ALLOCATED.with(Cell::get) - before)
    }

    /// What decoding may allocate per byte of answer, plus a constant: the
    /// smallest output (3 bytes) becomes an `Output` of about 130 bytes;
    /// nested JSON grows like `serde_json::Value` does.
    const PER_BYTE: usize = 64;
    const BASE: usize = 64 << 10;

    fn value() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(serde_json::Value::from),
            ".{0,16}".prop_map(serde_json::Value::from),
            Just(serde_json::json!({"a": {"b": [1, 2, {"c": null}]}})),
        ]
    }

    fn fields() -> impl Strategy<Value = Fields> {
        prop::collection::vec(("[a-z]{1,6}", value()), 0..8).prop_map(Fields::from_pairs)
    }

    fn downlink() -> impl Strategy<Value = Downlink> {
        (
            prop::collection::vec(any::<u8>(), 0..32),
            prop::option::of("[a-z/]{1,12}"),
            prop::option::of(1u8..=223),
            any::<bool>(),
            prop::option::of(0u8..=2),
        )
            .prop_map(|(payload, topic, fport, confirmed, qos)| Downlink {
                payload,
                topic,
                fport,
                confirmed,
                qos,
            })
    }

    fn output() -> impl Strategy<Value = Output> {
        let kind = prop_oneof![
            fields().prop_map(|fields| OutputKind::Telemetry { fields }),
            fields().prop_map(|fields| OutputKind::Attributes { fields }),
            ("[a-z]{1,8}", fields()).prop_map(|(name, fields)| OutputKind::Event { name, fields }),
            (".{0,8}", ".{0,8}").prop_map(|(title, description)| OutputKind::Alert {
                severity: Severity::Warning,
                title,
                description,
            }),
            any::<bool>().prop_map(|online| OutputKind::Status { online }),
            ("[a-z0-9-]{1,12}", any::<bool>(), ".{0,8}", fields()).prop_map(
                |(command_id, ok, error, fields)| OutputKind::Reply {
                    command_id,
                    ok,
                    error,
                    fields,
                }
            ),
        ];
        (
            prop::option::of("[a-z0-9-]{1,10}"),
            prop::option::of(any::<i64>()),
            kind,
        )
            .prop_map(|(device_id, timestamp, kind)| Output {
                device_id,
                timestamp,
                kind,
            })
    }

    fn decode(bytes: &[u8], caps: OutputCaps) -> Result<Vec<Output>, OutputViolation> {
        read_outputs(bytes, caps, &mut KeyInterner::default())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn valid_outputs_round_trip(outputs in prop::collection::vec(output(), 0..8)) {
            let mut bytes = Vec::new();
            put_outputs(&mut bytes, &outputs);
            let caps = OutputCaps { bytes: 1 << 20, count: 100, fields: 100 };
            prop_assert_eq!(decode(&bytes, caps).unwrap(), outputs);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_allocate_within_bounds(
            bytes in prop::collection::vec(any::<u8>(), 0..512),
            cap in 0usize..600,
            count in 0usize..50,
            max_fields in 0usize..50,
        ) {
            let caps = OutputCaps { bytes: cap, count, fields: max_fields };
            let (result, allocated) = allocated_by(|| decode(&bytes, caps));
            prop_assert!(allocated <= PER_BYTE * bytes.len() + BASE, "{allocated} bytes for {}", bytes.len());
            if bytes.len() > cap {
                prop_assert!(result.is_err());
            }
            if let Ok(outputs) = result {
                prop_assert!(outputs.len() <= count);
                for output in &outputs {
                    if let OutputKind::Telemetry { fields } | OutputKind::Attributes { fields } = &output.kind {
                        prop_assert!(fields.len() <= max_fields);
                    }
                    if let Some(device) = &output.device_id {
                        prop_assert!(crate::config::check_name(device).is_ok());
                    }
                    prop_assert!(serde_json::to_string(output).is_ok());
                }
            }
        }

        #[test]
        fn damaged_answers_never_panic_and_allocate_within_bounds(
            outputs in prop::collection::vec(output(), 1..6),
            damage in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = Vec::new();
            put_outputs(&mut bytes, &outputs);
            for (at, byte) in damage {
                let at = at.index(bytes.len());
                bytes[at] = byte;
            }
            bytes.truncate(cut.index(bytes.len() + 1));
            let caps = OutputCaps { bytes: 1 << 20, count: 100, fields: 100 };
            let (_, allocated) = allocated_by(|| decode(&bytes, caps));
            prop_assert!(allocated <= PER_BYTE * bytes.len() + BASE);
        }

        #[test]
        fn downlinks_round_trip(downlinks in prop::collection::vec(downlink(), 1..MAX_DOWNLINKS)) {
            let mut bytes = Vec::new();
            put_downlinks(&mut bytes, &downlinks);
            prop_assert_eq!(read_downlinks(&bytes, 1 << 20).unwrap(), downlinks);
        }

        #[test]
        fn arbitrary_downlink_answers_never_panic_and_allocate_within_bounds(
            bytes in prop::collection::vec(any::<u8>(), 0..512),
            cap in 0usize..600,
        ) {
            let (result, allocated) = allocated_by(|| read_downlinks(&bytes, cap));
            prop_assert!(allocated <= PER_BYTE * bytes.len() + BASE);
            if bytes.len() > cap {
                prop_assert_eq!(result, Err(None));
            } else if let Ok(downlinks) = result {
                prop_assert!(!downlinks.is_empty() && downlinks.len() <= MAX_DOWNLINKS);
            }
        }

        #[test]
        fn arbitrary_batches_never_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..512),
            messages in 0usize..4,
        ) {
            let caps = OutputCaps { bytes: 1 << 20, count: 100, fields: 100 };
            let (_, allocated) = allocated_by(|| read_results(&bytes, messages, caps, &mut KeyInterner::default()));
            prop_assert!(allocated <= PER_BYTE * bytes.len() + BASE);
        }
    }
}
