//! Commands for devices as a script's `encode` sees them, and the
//! downlinks it answers with (`sluice:script@0.2.1`).

use serde::{Deserialize, Serialize};

/// A command for one device, as `encode` receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandCall {
    /// sluice's id of the command; a device's `reply` names it.
    pub id: String,
    /// The device the command is for.
    pub device_id: String,
    /// The device's product.
    pub product: String,
    /// What to do, such as `set_setpoint`.
    pub name: String,
    /// The caller's parameters: the text of a JSON object.
    pub params: String,
    /// When the command was accepted (ms since the Unix epoch).
    pub issued_at: i64,
}

/// One payload for a device, as `encode` answers it.
///
/// As JSON (what `sluice script test --command` prints and fixtures
/// expect): `{"payload": "text"}` when the bytes are UTF-8 text, otherwise
/// `{"payload_hex": "0100003c"}`, plus `topic`, `fport`, `confirmed` and
/// `qos` where the script set them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Downlink {
    /// The bytes for the device.
    pub payload: Vec<u8>,
    /// A topic used instead of the product's command topic.
    pub topic: Option<String>,
    /// The LoRaWAN fPort.
    pub fport: Option<u8>,
    /// Whether a LoRaWAN downlink asks for an acknowledgement.
    pub confirmed: bool,
    /// The MQTT QoS, instead of the product's.
    pub qos: Option<u8>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DownlinkRepr {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    payload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    payload_hex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fport: Option<u8>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    confirmed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    qos: Option<u8>,
}

impl Serialize for Downlink {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text = std::str::from_utf8(&self.payload)
            .ok()
            .filter(|text| !text.chars().any(|c| c.is_control() && c != '\n'));
        DownlinkRepr {
            payload: text.map(str::to_owned),
            payload_hex: text.is_none().then(|| hex::encode(&self.payload)),
            topic: self.topic.clone(),
            fport: self.fport,
            confirmed: self.confirmed,
            qos: self.qos,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Downlink {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let repr = DownlinkRepr::deserialize(deserializer)?;
        let payload = match (repr.payload, repr.payload_hex) {
            (Some(text), None) => text.into_bytes(),
            (None, Some(digits)) => {
                let digits: String = digits.split_whitespace().collect();
                hex::decode(&digits)
                    .map_err(|e| serde::de::Error::custom(format!("payload_hex: {e}")))?
            }
            _ => {
                return Err(serde::de::Error::custom(
                    "a downlink has exactly one of `payload` (text) and `payload_hex`",
                ));
            }
        };
        Ok(Downlink {
            payload,
            topic: repr.topic,
            fport: repr.fport,
            confirmed: repr.confirmed,
            qos: repr.qos,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downlinks_are_text_when_they_can_be_and_hex_otherwise() {
        let binary = Downlink {
            payload: vec![1, 0, 0, 0x3c],
            fport: Some(2),
            ..Downlink::default()
        };
        let json = serde_json::to_string(&binary).unwrap();
        assert_eq!(json, r#"{"payload_hex":"0100003c","fport":2}"#);
        assert_eq!(serde_json::from_str::<Downlink>(&json).unwrap(), binary);
        let text = Downlink {
            payload: br#"{"interval":60}"#.to_vec(),
            qos: Some(1),
            ..Downlink::default()
        };
        let json = serde_json::to_string(&text).unwrap();
        assert_eq!(json, r#"{"payload":"{\"interval\":60}","qos":1}"#);
        assert_eq!(serde_json::from_str::<Downlink>(&json).unwrap(), text);
        assert!(serde_json::from_str::<Downlink>(r#"{"payload_hex":"0g"}"#).is_err());
        assert!(serde_json::from_str::<Downlink>(r#"{}"#).is_err());
    }
}
