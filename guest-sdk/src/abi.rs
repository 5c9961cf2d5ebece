//! The packed encoding of the `sluice:script@0.2.1` world, on the script's
//! side: the message (or command) read from the host's bytes, the outputs
//! (or downlinks) written back in one buffer. The encoding is specified in `wit/script.wit` and
//! `docs/script-abi.md`; [`crate::script!`] calls [`parse`] and
//! [`parse_batch`], so a script never sees it.

use crate::{
    Command, Downlink, Field, Message, Output, OutputKind, ScriptError, Severity, SourceKind, Value,
};

/// Reads the primitives of a message, failing with what was cut short.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize, what: &str) -> Result<&'a [u8], ScriptError> {
        let end = self
            .at
            .checked_add(len)
            .filter(|&end| end <= self.bytes.len());
        let Some(end) = end else {
            return Err(bad_message(format!(
                "{what} is cut short at byte {}",
                self.at
            )));
        };
        let bytes = &self.bytes[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn u32(&mut self, what: &str) -> Result<usize, ScriptError> {
        let bytes = self.take(4, what)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize)
    }

    fn bytes(&mut self, what: &str) -> Result<&'a [u8], ScriptError> {
        let len = self.u32(what)?;
        self.take(len, what)
    }

    fn string(&mut self, what: &str) -> Result<String, ScriptError> {
        let bytes = self.bytes(what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|e| bad_message(format!("{what} is not UTF-8: {e}")))
    }

    fn command(&mut self) -> Result<Command, ScriptError> {
        let id = self.string("the command id")?;
        let device_id = self.string("the device id")?;
        let product = self.string("the product")?;
        let name = self.string("the command name")?;
        let params = self.string("the params")?;
        let time = self.take(8, "the issue time")?;
        let issued_at = i64::from_le_bytes(time.try_into().expect("8 bytes were taken"));
        Ok(Command {
            id,
            device_id,
            product,
            name,
            params,
            issued_at,
        })
    }

    fn message(&mut self) -> Result<Message, ScriptError> {
        let device_id = self.string("the device id")?;
        let product = self.string("the product")?;
        let topic = self.string("the topic")?;
        let time = self.take(8, "the receive time")?;
        let received_at = i64::from_le_bytes(time.try_into().expect("8 bytes were taken"));
        let source = match self.take(1, "the source")?[0] {
            0 => SourceKind::Mqtt,
            1 => SourceKind::Kafka,
            2 => SourceKind::Http,
            _ => SourceKind::Internal,
        };
        let payload = self.bytes("the payload")?.to_vec();
        Ok(Message {
            device_id,
            product,
            topic,
            payload,
            received_at,
            source,
        })
    }
}

/// The host sent bytes that are not a message: only a host speaking
/// another version of the world does that.
fn bad_message(reason: String) -> ScriptError {
    ScriptError::new(
        "bad-message",
        format!(
            "the host's message does not decode ({reason}); is the script built for this sluice?"
        ),
    )
}

/// A packed message.
pub fn read_message(bytes: &[u8]) -> Result<Message, ScriptError> {
    Reader { bytes, at: 0 }.message()
}

/// A packed command.
pub fn read_command(bytes: &[u8]) -> Result<Command, ScriptError> {
    Reader { bytes, at: 0 }.command()
}

/// Packed messages: a count, then each.
pub fn read_messages(bytes: &[u8]) -> Result<Vec<Message>, ScriptError> {
    let mut reader = Reader { bytes, at: 0 };
    let count = reader.u32("the message count")?;
    // Every message takes at least 25 bytes: no count can make this
    // allocate more than the input allows.
    let mut messages = Vec::with_capacity(count.min(bytes.len() / 25));
    for _ in 0..count {
        messages.push(reader.message()?);
    }
    Ok(messages)
}

/// Output kinds, flags and value tags of the encoding.
const TELEMETRY: u8 = 0;
const ATTRIBUTES: u8 = 1;
const EVENT: u8 = 2;
const ALERT: u8 = 3;
const STATUS: u8 = 4;
const REPLY: u8 = 5;
const HAS_DEVICE: u8 = 1;
const HAS_TIMESTAMP: u8 = 2;

fn put_len(out: &mut Vec<u8>, len: usize) {
    // Lengths are below 4 GiB: a script's memory is far smaller.
    out.extend_from_slice(&(len as u32).to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    put_len(out, text.len());
    out.extend_from_slice(text.as_bytes());
}

fn value_len(value: &Value) -> usize {
    1 + match value {
        Value::Null => 0,
        Value::Boolean(_) => 1,
        Value::Integer(_) | Value::Float(_) => 8,
        Value::Text(text) | Value::Json(text) => 4 + text.len(),
    }
}

fn fields_len(fields: &[Field]) -> usize {
    4 + fields
        .iter()
        .map(|f| 4 + f.key.len() + value_len(&f.value))
        .sum::<usize>()
}

/// The exact size of `outputs` packed.
fn outputs_len(outputs: &[Output]) -> usize {
    4 + outputs
        .iter()
        .map(|output| {
            2 + output.device_id.as_ref().map_or(0, |d| 4 + d.len())
                + output.timestamp.map_or(0, |_| 8)
                + match &output.kind {
                    OutputKind::Telemetry(fields) | OutputKind::Attributes(fields) => {
                        fields_len(fields)
                    }
                    OutputKind::Event(event) => 4 + event.name.len() + fields_len(&event.fields),
                    OutputKind::Alert(alert) => 1 + 8 + alert.title.len() + alert.description.len(),
                    OutputKind::Status(_) => 1,
                    OutputKind::Reply(reply) => {
                        4 + reply.command_id.len()
                            + 1
                            + 4
                            + reply.outcome.as_ref().err().map_or(0, String::len)
                            + fields_len(&reply.fields)
                    }
                }
        })
        .sum::<usize>()
}

fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.push(0),
        Value::Boolean(b) => out.extend_from_slice(&[1, u8::from(*b)]),
        Value::Integer(i) => {
            out.push(2);
            out.extend_from_slice(&i.to_le_bytes());
        }
        Value::Float(f) => {
            out.push(3);
            out.extend_from_slice(&f.to_le_bytes());
        }
        Value::Text(text) => {
            out.push(4);
            put_str(out, text);
        }
        Value::Json(text) => {
            out.push(5);
            put_str(out, text);
        }
    }
}

fn put_fields(out: &mut Vec<u8>, fields: &[Field]) {
    put_len(out, fields.len());
    for field in fields {
        put_str(out, &field.key);
        put_value(out, &field.value);
    }
}

/// Appends packed outputs: a count, then each.
pub fn put_outputs(out: &mut Vec<u8>, outputs: &[Output]) {
    put_len(out, outputs.len());
    for output in outputs {
        let kind = match &output.kind {
            OutputKind::Telemetry(_) => TELEMETRY,
            OutputKind::Attributes(_) => ATTRIBUTES,
            OutputKind::Event(_) => EVENT,
            OutputKind::Alert(_) => ALERT,
            OutputKind::Status(_) => STATUS,
            OutputKind::Reply(_) => REPLY,
        };
        let mut flags = 0;
        if output.device_id.is_some() {
            flags |= HAS_DEVICE;
        }
        if output.timestamp.is_some() {
            flags |= HAS_TIMESTAMP;
        }
        out.extend_from_slice(&[kind, flags]);
        if let Some(device) = &output.device_id {
            put_str(out, device);
        }
        if let Some(timestamp) = output.timestamp {
            out.extend_from_slice(&timestamp.to_le_bytes());
        }
        match &output.kind {
            OutputKind::Telemetry(fields) | OutputKind::Attributes(fields) => {
                put_fields(out, fields);
            }
            OutputKind::Event(event) => {
                put_str(out, &event.name);
                put_fields(out, &event.fields);
            }
            OutputKind::Alert(alert) => {
                out.push(match alert.severity {
                    Severity::Info => 0,
                    Severity::Warning => 1,
                    Severity::Critical => 2,
                });
                put_str(out, &alert.title);
                put_str(out, &alert.description);
            }
            OutputKind::Status(online) => out.push(u8::from(*online)),
            OutputKind::Reply(reply) => {
                put_str(out, &reply.command_id);
                out.push(u8::from(reply.outcome.is_ok()));
                put_str(out, reply.outcome.as_ref().err().map_or("", String::as_str));
                put_fields(out, &reply.fields);
            }
        }
    }
}

/// Downlink flags of the encoding.
const HAS_TOPIC: u8 = 1;
const HAS_FPORT: u8 = 2;
const CONFIRMED: u8 = 4;
const HAS_QOS: u8 = 8;

/// `downlinks` packed: a count, then each.
pub fn pack_downlinks(downlinks: &[Downlink]) -> Vec<u8> {
    let size = 4 + downlinks
        .iter()
        .map(|d| {
            1 + d.topic.as_ref().map_or(0, |t| 4 + t.len())
                + usize::from(d.fport.is_some())
                + usize::from(d.qos.is_some())
                + 4
                + d.payload.len()
        })
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    put_len(&mut out, downlinks.len());
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
            put_str(&mut out, topic);
        }
        out.extend(downlink.fport);
        out.extend(downlink.qos);
        put_len(&mut out, downlink.payload.len());
        out.extend_from_slice(&downlink.payload);
    }
    out
}

/// Runs `encode` on one packed command. Used by [`crate::script!`].
#[doc(hidden)]
pub fn encode(
    command: Vec<u8>,
    encode: fn(&Command) -> Result<Vec<Downlink>, ScriptError>,
) -> Result<Vec<u8>, ScriptError> {
    let command = read_command(&command)?;
    let downlinks = crate::host::run(&command, encode)?;
    Ok(pack_downlinks(&downlinks))
}

/// What `encode` answers for a script that only parses.
#[doc(hidden)]
pub fn not_supported(_command: Vec<u8>) -> Result<Vec<u8>, ScriptError> {
    Err(ScriptError::new(
        "not-supported",
        "this script does not encode commands",
    ))
}

/// `outputs` packed into a buffer of exactly their size.
pub fn pack_outputs(outputs: &[Output]) -> Vec<u8> {
    let mut out = Vec::with_capacity(outputs_len(outputs));
    put_outputs(&mut out, outputs);
    out
}

/// Runs `parse` on one packed message. Used by [`crate::script!`].
#[doc(hidden)]
pub fn parse(
    message: Vec<u8>,
    parse: fn(&Message) -> Result<Vec<Output>, ScriptError>,
) -> Result<Vec<u8>, ScriptError> {
    let message = read_message(&message)?;
    let outputs = crate::host::run(&message, parse)?;
    Ok(pack_outputs(&outputs))
}

/// Runs `parse` on each of the packed messages and packs their results.
/// Used by [`crate::script!`].
#[doc(hidden)]
pub fn parse_batch(
    messages: Vec<u8>,
    parse: fn(&Message) -> Result<Vec<Output>, ScriptError>,
) -> Vec<u8> {
    let messages = match read_messages(&messages) {
        Ok(messages) => messages,
        // Not a batch this SDK can read: an answer of no results, which
        // the host reports for every message.
        Err(_) => return 0u32.to_le_bytes().to_vec(),
    };
    let mut out = Vec::with_capacity(4 + messages.len() * 64);
    put_len(&mut out, messages.len());
    for message in &messages {
        match crate::host::run(message, parse) {
            Ok(outputs) => {
                out.push(0);
                put_len(&mut out, outputs_len(&outputs));
                put_outputs(&mut out, &outputs);
            }
            Err(error) => {
                out.push(1);
                put_len(&mut out, 8 + error.code.len() + error.message.len());
                put_str(&mut out, &error.code);
                put_str(&mut out, &error.message);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Fields;

    fn packed_message(device: &str, payload: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for text in [device, "product", "topic"] {
            put_str(&mut bytes, text);
        }
        bytes.extend_from_slice(&7i64.to_le_bytes());
        bytes.push(2);
        put_len(&mut bytes, payload.len());
        bytes.extend_from_slice(payload);
        bytes
    }

    #[test]
    fn messages_decode_and_cut_short_ones_are_refused() {
        let bytes = packed_message("d-1", b"{}");
        let message = read_message(&bytes).unwrap();
        assert_eq!(message.device_id, "d-1");
        assert_eq!(message.topic, "topic");
        assert_eq!(message.payload, b"{}");
        assert_eq!(message.received_at, 7);
        assert_eq!(message.source, SourceKind::Http);
        let error = read_message(&bytes[..bytes.len() - 1]).unwrap_err();
        assert_eq!(error.code, "bad-message");
        assert!(error.message.contains("payload"), "{}", error.message);
    }

    #[test]
    fn outputs_pack_to_their_exact_length() {
        let outputs = vec![
            Output::telemetry(
                Fields::new()
                    .with("t", 21.5)
                    .with("n", 3)
                    .with("s", "ok")
                    .with("b", true)
                    .with("z", None::<f64>),
            )
            .for_device("sub-1")
            .at(5),
            Output::event("opened", Fields::new().with("door", 2)),
            Output::alert(Severity::Critical, "Hot", "82 °C"),
            Output::status(false),
            Output::attributes(vec![Field::new("fw", Value::Json("[1]".into()))]),
        ];
        let packed = pack_outputs(&outputs);
        assert_eq!(packed.len(), outputs_len(&outputs));
        assert_eq!(packed.capacity(), packed.len());
        assert_eq!(&packed[..4], &5u32.to_le_bytes());
        // Telemetry, device id and timestamp set.
        assert_eq!(&packed[4..6], &[TELEMETRY, HAS_DEVICE | HAS_TIMESTAMP]);
    }
}
