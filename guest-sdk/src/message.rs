//! Payload helpers on [`Message`]: JSON, text, binary and per-device state.

use serde::de::DeserializeOwned;

use crate::{Message, Reader, ScriptError, SourceKind, host};

impl Message {
    /// A message for `device_id` carrying `payload`, as the host would pass it;
    /// handy in native tests of a script.
    pub fn new(device_id: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Message {
            device_id: device_id.into(),
            product: String::new(),
            topic: String::new(),
            payload: payload.into(),
            received_at: 0,
            source: SourceKind::Internal,
        }
    }

    /// The payload parsed as JSON into `T`; error code `invalid-json`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ScriptError> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            ScriptError::new("invalid-json", format!("payload is not valid JSON: {e}"))
        })
    }

    /// The payload as UTF-8 text; error code `invalid-utf8`.
    pub fn text(&self) -> Result<&str, ScriptError> {
        std::str::from_utf8(&self.payload).map_err(|e| {
            ScriptError::new("invalid-utf8", format!("payload is not UTF-8 text: {e}"))
        })
    }

    /// A reader over the payload bytes.
    pub fn reader(&self) -> Reader<'_> {
        Reader::new(&self.payload)
    }

    /// The state this script last stored for the message's device.
    pub fn state(&self) -> Option<Vec<u8>> {
        host::state_get(&self.device_id)
    }

    /// Stores state for the message's device; an empty value deletes it.
    /// Fails as [`host::state_set`] does.
    pub fn set_state(&self, value: &[u8]) -> Result<(), ScriptError> {
        host::state_set(&self.device_id, value)
    }

    /// The state for the message's device, decoded from JSON; `None` when
    /// nothing is stored or it no longer decodes as `T`.
    pub fn state_json<T: DeserializeOwned>(&self) -> Option<T> {
        self.state()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
    }

    /// Stores `value` as JSON state for the message's device.
    pub fn set_state_json<T: serde::Serialize>(&self, value: &T) -> Result<(), ScriptError> {
        let bytes = serde_json::to_vec(value)
            .map_err(|e| ScriptError::new("state-encode", format!("cannot encode state: {e}")))?;
        self.set_state(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_errors_name_the_problem() {
        let msg = Message::new("d", b"{nope".to_vec());
        let err = msg.json::<serde_json::Value>().unwrap_err();
        assert_eq!(err.code, "invalid-json");
        assert!(
            err.message.contains("key must be a string"),
            "{}",
            err.message
        );
    }

    #[test]
    fn state_round_trips_per_device() {
        let a = Message::new("state-a", Vec::new());
        let b = Message::new("state-b", Vec::new());
        a.set_state_json(&41u32).unwrap();
        assert_eq!(a.state_json::<u32>(), Some(41));
        assert_eq!(b.state_json::<u32>(), None);
        a.set_state(&[]).unwrap();
        assert_eq!(a.state(), None);
    }
}
