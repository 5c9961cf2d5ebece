//! What a script works with: the [`Message`] it parses and the [`Output`]s
//! it returns. They cross to sluice in the packed encoding of the
//! `sluice:script` world (see [`crate::abi`]); a script only sees these.

/// How a message reached sluice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKind {
    /// An MQTT publish.
    Mqtt,
    /// A Kafka record.
    Kafka,
    /// An HTTP ingest request.
    Http,
    /// Produced inside sluice: the device simulator, `sluice script test`, fixtures.
    Internal,
}

/// One raw message from a device, exactly as it arrived.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The device the message was routed to (for a gateway: the gateway itself).
    pub device_id: String,
    /// The product whose script is running.
    pub product: String,
    /// The MQTT topic, Kafka topic or HTTP path the message came from.
    pub topic: String,
    /// The payload bytes, unchanged.
    pub payload: Vec<u8>,
    /// When sluice received the message, in milliseconds since the Unix epoch.
    pub received_at: i64,
    /// How the message arrived.
    pub source: SourceKind,
}

/// A typed field value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// JSON `null`.
    Null,
    /// `true` or `false`.
    Boolean(bool),
    /// A whole number.
    Integer(i64),
    /// A finite floating-point number (NaN and infinities are refused by the host).
    Float(f64),
    /// A UTF-8 string.
    Text(String),
    /// A nested JSON document (object or array), as JSON text.
    Json(String),
}

/// A named value, such as `temperature = 21.5`.
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    /// The field name; not empty.
    pub key: String,
    /// The field value.
    pub value: Value,
}

/// How serious an alert is, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Worth knowing; no action needed.
    Info,
    /// Needs attention soon.
    Warning,
    /// Needs action now.
    Critical,
}

/// A named occurrence with its details, such as `door_opened`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event name; not empty.
    pub name: String,
    /// Details of the event.
    pub fields: Vec<Field>,
}

/// A condition a person should see.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// How serious it is.
    pub severity: Severity,
    /// One line that names the condition.
    pub title: String,
    /// What happened, with the values that matter.
    pub description: String,
}

/// What one output reports.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputKind {
    /// Measured values, merged into the device's latest snapshot.
    Telemetry(Vec<Field>),
    /// Slowly changing properties (firmware version, configuration).
    Attributes(Vec<Field>),
    /// A named occurrence.
    Event(Event),
    /// A condition a person should see.
    Alert(Alert),
    /// An explicit online (`true`) or offline (`false`) signal.
    Status(bool),
    /// The device's answer to a command sluice sent it.
    Reply(Reply),
}

/// A device's answer to a command: it completes the command whose id it
/// names, for the device the output is about.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The [`Command::id`] of the command answered.
    pub command_id: String,
    /// `Ok` when the device did what was asked; `Err` with why not.
    pub outcome: Result<(), String>,
    /// Values the device answered with.
    pub fields: Vec<Field>,
}

/// A command for a device, as [`crate::script!`]'s `encode` receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// sluice's id of the command; a device's reply names it
    /// ([`Output::reply`]), so devices that answer carry it back.
    pub id: String,
    /// The device the command is for.
    pub device_id: String,
    /// The device's product.
    pub product: String,
    /// What to do, such as `set_setpoint`.
    pub name: String,
    /// The caller's parameters: the text of a JSON object (`{}` when none).
    pub params: String,
    /// When sluice accepted the command, in milliseconds since the Unix epoch.
    pub issued_at: i64,
}

/// One payload for a device, as `encode` answers it; build with
/// [`Downlink::new`] and the setters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Downlink {
    /// The bytes for the device, sent unchanged.
    pub payload: Vec<u8>,
    /// A topic used instead of the product's command topic (MQTT, Kafka).
    pub topic: Option<String>,
    /// The LoRaWAN fPort, 1 to 223.
    pub fport: Option<u8>,
    /// Whether a LoRaWAN downlink asks the device for an acknowledgement.
    pub confirmed: bool,
    /// The MQTT QoS (0, 1 or 2), instead of the product's.
    pub qos: Option<u8>,
}

/// One result of parsing a message.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// The device this output is about; `None` means the message's own device.
    /// Gateways name their sub-devices here.
    pub device_id: Option<String>,
    /// When the values were measured, in milliseconds since the Unix epoch;
    /// `None` means the message's `received_at`.
    pub timestamp: Option<i64>,
    /// What the output reports.
    pub kind: OutputKind,
}
