//! A script built against `sluice:script@0.2.0` (the world before `encode`;
//! `wit/script.wit` here is that version): it must keep loading and
//! parsing, and its product does not accept commands.

wit_bindgen::generate!({
    path: "wit",
    world: "sluice:script/script@0.2.0",
});

use sluice::script::host::{LogLevel, log};

struct V020;

/// One telemetry output with the field `bytes` = the payload's length,
/// packed by hand as the 0.2.0 encoding specifies.
fn outputs(message: &[u8]) -> Vec<u8> {
    // The payload is the message's last `bytes`: skip three strings, the
    // receive time and the source.
    let mut at = 0;
    for _ in 0..3 {
        let len = u32::from_le_bytes(message[at..at + 4].try_into().unwrap()) as usize;
        at += 4 + len;
    }
    at += 8 + 1;
    let payload = u32::from_le_bytes(message[at..at + 4].try_into().unwrap());
    let mut out = Vec::new();
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&5u32.to_le_bytes());
    out.extend_from_slice(b"bytes");
    out.push(2);
    out.extend_from_slice(&i64::from(payload).to_le_bytes());
    out
}

impl Guest for V020 {
    fn parse(message: Vec<u8>) -> Result<Vec<u8>, ScriptError> {
        log(LogLevel::Debug, "parsing the 0.2.0 way");
        Ok(outputs(&message))
    }

    fn parse_batch(messages: Vec<u8>) -> Vec<u8> {
        // Not used by the test; an empty answer.
        let _ = messages;
        0u32.to_le_bytes().to_vec()
    }
}

export!(V020);
