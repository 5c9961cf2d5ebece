//! Constructors for [`Output`] and [`ScriptError`].

use serde::de::DeserializeOwned;

use crate::{
    Alert, Command, Downlink, Event, Field, Output, OutputKind, Reply, ScriptError, Severity,
};

impl Output {
    fn of(kind: OutputKind) -> Self {
        Output {
            device_id: None,
            timestamp: None,
            kind,
        }
    }

    /// Measured values, merged into the device's latest snapshot.
    pub fn telemetry(fields: impl Into<Vec<Field>>) -> Self {
        Self::of(OutputKind::Telemetry(fields.into()))
    }

    /// Slowly changing properties, such as a firmware version.
    pub fn attributes(fields: impl Into<Vec<Field>>) -> Self {
        Self::of(OutputKind::Attributes(fields.into()))
    }

    /// A named occurrence with details.
    pub fn event(name: impl Into<String>, fields: impl Into<Vec<Field>>) -> Self {
        Self::of(OutputKind::Event(Event {
            name: name.into(),
            fields: fields.into(),
        }))
    }

    /// A condition a person should see.
    pub fn alert(
        severity: Severity,
        title: impl Into<String>,
        description: impl Into<String>,
    ) -> Self {
        Self::of(OutputKind::Alert(Alert {
            severity,
            title: title.into(),
            description: description.into(),
        }))
    }

    /// An explicit online (`true`) or offline (`false`) signal.
    pub fn status(online: bool) -> Self {
        Self::of(OutputKind::Status(online))
    }

    /// The device's answer to command `command_id`: done, with `fields`.
    pub fn reply(command_id: impl Into<String>, fields: impl Into<Vec<Field>>) -> Self {
        Self::of(OutputKind::Reply(Reply {
            command_id: command_id.into(),
            outcome: Ok(()),
            fields: fields.into(),
        }))
    }

    /// The device's answer to command `command_id`: it failed, for `error`.
    pub fn reply_error(command_id: impl Into<String>, error: impl Into<String>) -> Self {
        Self::of(OutputKind::Reply(Reply {
            command_id: command_id.into(),
            outcome: Err(error.into()),
            fields: Vec::new(),
        }))
    }

    /// The same output, about another device (a gateway's sub-device).
    pub fn for_device(mut self, device_id: impl Into<String>) -> Self {
        self.device_id = Some(device_id.into());
        self
    }

    /// The same output, measured at `timestamp_ms` (milliseconds since the Unix epoch).
    pub fn at(mut self, timestamp_ms: i64) -> Self {
        self.timestamp = Some(timestamp_ms);
        self
    }
}

impl Command {
    /// The params as `T`, or an `invalid-params` error naming the command.
    pub fn params<T: DeserializeOwned>(&self) -> Result<T, ScriptError> {
        serde_json::from_str(&self.params).map_err(|e| {
            ScriptError::new(
                "invalid-params",
                format!("the params of `{}` do not fit: {e}", self.name),
            )
        })
    }

    /// The `unknown-command` error for this command's name.
    pub fn unknown(&self) -> ScriptError {
        ScriptError::new(
            "unknown-command",
            format!("this product has no command `{}`", self.name),
        )
    }
}

impl Downlink {
    /// A downlink of `payload`, with the product's topic and QoS.
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        Downlink {
            payload: payload.into(),
            ..Downlink::default()
        }
    }

    /// The same downlink on LoRaWAN fPort `port` (1 to 223).
    pub fn fport(mut self, port: u8) -> Self {
        self.fport = Some(port);
        self
    }

    /// The same downlink, asking the device to acknowledge it (LoRaWAN).
    pub fn confirmed(mut self) -> Self {
        self.confirmed = true;
        self
    }

    /// The same downlink on `topic` instead of the product's command topic.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// The same downlink at MQTT QoS `qos` (0, 1 or 2).
    pub fn qos(mut self, qos: u8) -> Self {
        self.qos = Some(qos);
        self
    }
}

impl ScriptError {
    /// An error with a stable kebab-case `code` and a sentence for people.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        ScriptError {
            code: code.into(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Fields;

    #[test]
    fn builders_set_device_and_time() {
        let out = Output::telemetry(Fields::new().with("t", 1))
            .for_device("sub-1")
            .at(1_700_000_000_000);
        assert_eq!(out.device_id.as_deref(), Some("sub-1"));
        assert_eq!(out.timestamp, Some(1_700_000_000_000));
        assert!(matches!(out.kind, OutputKind::Telemetry(ref f) if f.len() == 1));
    }
}
