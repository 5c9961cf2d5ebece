//! Constructors for [`Output`] and [`ScriptError`].

use crate::{Alert, Event, Field, Output, OutputKind, ScriptError, Severity};

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
