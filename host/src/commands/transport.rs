//! How downlinks leave sluice: the MQTT message each becomes, by the
//! product's transport (a topic template, ChirpStack v4, The Things Stack
//! v3), and the MQTT connection that carries them.

use std::sync::Mutex;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::model::CommandRecord;
use crate::script::Downlink;

/// The default topic template of MQTT commands.
pub const DEFAULT_TOPIC: &str = "devices/{product}/{device}/command";

/// How a product's commands reach its devices (`[products.<name>.commands]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "transport", rename_all = "snake_case", deny_unknown_fields)]
pub enum TransportConfig {
    /// Each downlink's payload, published unchanged on a topic.
    Mqtt {
        /// Topic template: `{product}`, `{device}` and `{tenant}` are
        /// replaced; a downlink's own topic wins.
        #[serde(default = "default_topic")]
        topic: String,
        /// MQTT QoS, 0 to 2; a downlink's own wins.
        #[serde(default = "default_qos")]
        qos: u8,
    },
    /// A ChirpStack v4 downlink: JSON `{devEui, confirmed, fPort, data}`
    /// on `application/{application}/device/{device}/command/down`.
    Chirpstack {
        /// The ChirpStack application id the devices belong to; absent:
        /// each device's, from the topic of its uplinks
        /// (`application/{application}/device/{dev_eui}/event/up`).
        #[serde(default)]
        application: Option<String>,
        /// The fPort of downlinks that name none.
        #[serde(default)]
        fport: Option<u8>,
        /// MQTT QoS, 0 to 2.
        #[serde(default = "default_qos")]
        qos: u8,
    },
    /// A The Things Stack v3 downlink push: JSON `{downlinks: [{f_port,
    /// frm_payload, confirmed, priority}]}` on
    /// `v3/{application}/devices/{device}/down/push`.
    Ttn {
        /// The application id, with `@{tenant}` on multi-tenant
        /// deployments (`my-app@ttn`); absent: each device's, from the
        /// topic of its uplinks (`v3/{application}/devices/{device}/up`).
        #[serde(default)]
        application: Option<String>,
        /// The fPort of downlinks that name none.
        #[serde(default)]
        fport: Option<u8>,
        /// MQTT QoS, 0 to 2.
        #[serde(default = "default_qos")]
        qos: u8,
    },
    /// Each downlink's payload as a Kafka record keyed by the device id.
    Kafka {
        /// Bootstrap servers, `host:port[,host:port]`.
        brokers: String,
        /// Topic template: `{product}`, `{device}` and `{tenant}` are
        /// replaced; a downlink's own topic wins.
        topic: String,
        /// More librdkafka producer settings.
        #[serde(default)]
        options: std::collections::BTreeMap<String, String>,
    },
    /// Each downlink's payload, handed to sluice's own device simulator
    /// (`sluice demo`), whose simulated devices obey them.
    Simulator,
}

fn default_topic() -> String {
    DEFAULT_TOPIC.to_owned()
}

fn default_qos() -> u8 {
    1
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig::Mqtt {
            topic: default_topic(),
            qos: default_qos(),
        }
    }
}

impl TransportConfig {
    /// Why the settings cannot work, for the config check.
    pub fn check(&self) -> Result<(), String> {
        let (qos, fport) = match self {
            TransportConfig::Mqtt { topic, qos } => {
                if topic.is_empty() || topic.contains(['+', '#']) {
                    return Err(format!("topic {topic:?} is empty or holds a wildcard"));
                }
                (*qos, None)
            }
            TransportConfig::Chirpstack {
                application,
                fport,
                qos,
            }
            | TransportConfig::Ttn {
                application,
                fport,
                qos,
            } => {
                if let Some(application) = application
                    && (application.is_empty() || application.contains(['/', '+', '#']))
                {
                    return Err(format!(
                        "application {application:?} is empty or holds `/`, `+` or `#`"
                    ));
                }
                (*qos, *fport)
            }
            TransportConfig::Kafka { brokers, topic, .. } => {
                if brokers.is_empty() {
                    return Err("brokers is empty".into());
                }
                if topic.is_empty() || topic.contains(['+', '#', '/']) {
                    return Err(format!("topic {topic:?} is empty or holds `/`, `+` or `#`"));
                }
                (0, None)
            }
            TransportConfig::Simulator => (0, None),
        };
        if qos > 2 {
            return Err(format!("qos {qos} is not 0, 1 or 2"));
        }
        if let Some(port) = fport
            && !(1..=223).contains(&port)
        {
            return Err(format!("fport {port} is not within 1 to 223"));
        }
        Ok(())
    }

    /// Whether the application of each device comes from its uplinks'
    /// topics, and which part of them names it.
    pub fn learns_application(&self) -> Option<fn(&str) -> Option<&str>> {
        match self {
            TransportConfig::Chirpstack {
                application: None, ..
            } => Some(chirpstack_application),
            TransportConfig::Ttn {
                application: None, ..
            } => Some(ttn_application),
            _ => None,
        }
    }

    /// The message that carries `downlink` of `command` (for the simulator:
    /// its topic is the device id); `learned` is the device's application
    /// as its uplinks named it, for network servers configured without one.
    pub fn publish_of(
        &self,
        command: &CommandRecord,
        downlink: &Downlink,
        learned: Option<&str>,
    ) -> Result<Outgoing, String> {
        let application_of =
            |configured: &Option<String>| {
                configured.as_deref().or(learned).map(str::to_owned).ok_or_else(|| {
                format!(
                    "the application of device {:?} is not known: set the product's commands \
                     `application`, or let the device send an uplink first",
                    command.device_id
                )
            })
            };
        let b64 = || base64::engine::general_purpose::STANDARD.encode(&downlink.payload);
        let own_topic = |template: &str| {
            downlink.topic.clone().unwrap_or_else(|| {
                template
                    .replace("{product}", &command.product)
                    .replace("{device}", &command.device_id)
                    .replace("{tenant}", &command.tenant_id)
            })
        };
        let port = |fport: &Option<u8>| {
            downlink.fport.or(*fport).ok_or_else(|| {
                "the downlink has no fPort and the product's commands set no `fport`".to_owned()
            })
        };
        Ok(match self {
            TransportConfig::Mqtt { topic, qos } => Outgoing {
                topic: own_topic(topic),
                qos: downlink.qos.unwrap_or(*qos),
                payload: downlink.payload.clone(),
            },
            TransportConfig::Kafka { topic, .. } => Outgoing {
                topic: own_topic(topic),
                qos: 0,
                payload: downlink.payload.clone(),
            },
            TransportConfig::Chirpstack {
                application,
                fport,
                qos,
            } => Outgoing {
                topic: format!(
                    "application/{}/device/{}/command/down",
                    application_of(application)?,
                    command.device_id
                ),
                qos: *qos,
                payload: serde_json::to_vec(&serde_json::json!({
                    "devEui": command.device_id,
                    "confirmed": downlink.confirmed,
                    "fPort": port(fport)?,
                    "data": b64(),
                }))
                .expect("JSON of strings, numbers and booleans"),
            },
            TransportConfig::Ttn {
                application,
                fport,
                qos,
            } => Outgoing {
                topic: format!(
                    "v3/{}/devices/{}/down/push",
                    application_of(application)?,
                    command.device_id
                ),
                qos: *qos,
                payload: serde_json::to_vec(&serde_json::json!({
                    "downlinks": [{
                        "f_port": port(fport)?,
                        "frm_payload": b64(),
                        "confirmed": downlink.confirmed,
                        "priority": "NORMAL",
                    }],
                }))
                .expect("JSON of strings, numbers and booleans"),
            },
            TransportConfig::Simulator => Outgoing {
                topic: command.device_id.clone(),
                qos: 0,
                payload: downlink.payload.clone(),
            },
        })
    }
}

/// The application of a ChirpStack v4 uplink topic
/// (`application/{application}/device/{dev_eui}/event/up`).
fn chirpstack_application(topic: &str) -> Option<&str> {
    let mut parts = topic.split('/');
    (parts.next() == Some("application"))
        .then(|| parts.next())
        .flatten()
        .filter(|app| !app.is_empty() && parts.next() == Some("device"))
}

/// The application (`{app}@{tenant}`) of a The Things Stack v3 uplink
/// topic (`v3/{application}/devices/{device}/up`).
fn ttn_application(topic: &str) -> Option<&str> {
    let mut parts = topic.split('/');
    (parts.next() == Some("v3"))
        .then(|| parts.next())
        .flatten()
        .filter(|app| !app.is_empty() && parts.next() == Some("devices"))
}

/// One message to publish: an MQTT publish, a Kafka record (keyed by the
/// device id), or the simulator's downlink (the topic is the device id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Where: the MQTT or Kafka topic.
    pub topic: String,
    /// At which QoS (MQTT).
    pub qos: u8,
    /// What.
    pub payload: Vec<u8>,
}

/// A downlink for the device simulator: the device, and the payload.
pub type SimulatedDownlink = (String, Vec<u8>);

/// How many downlinks may wait for the simulator.
const SIMULATOR_QUEUE: usize = 256;

/// Publishes on the broker connection of the first MQTT source, which
/// installs its client here while it runs (and hands downlinks of the
/// `simulator` transport to the device simulator, when one runs).
#[derive(Default)]
pub struct MqttDownlinks {
    client: Mutex<Option<crate::source::MqttClient>>,
    simulator: Mutex<Option<tokio::sync::mpsc::Sender<SimulatedDownlink>>>,
}

impl std::fmt::Debug for MqttDownlinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttDownlinks")
            .field("connected", &self.lock().is_some())
            .finish()
    }
}

impl MqttDownlinks {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<crate::source::MqttClient>> {
        self.client
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Installs (or, with `None`, removes) the client downlinks go through.
    pub fn install(&self, client: Option<crate::source::MqttClient>) {
        *self.lock() = client;
    }

    /// The downlinks of the `simulator` transport, from now on.
    pub fn simulator(&self) -> tokio::sync::mpsc::Receiver<SimulatedDownlink> {
        let (tx, rx) = tokio::sync::mpsc::channel(SIMULATOR_QUEUE);
        *self
            .simulator
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tx);
        rx
    }

    /// Hands a downlink to the simulator.
    pub fn simulate(&self, device: String, payload: Vec<u8>) -> Result<(), String> {
        let simulator = self
            .simulator
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        match simulator {
            Some(simulator) => simulator
                .try_send((device, payload))
                .map_err(|e| format!("the device simulator does not take it: {e}")),
            None => Err("no device simulator runs".into()),
        }
    }

    /// Queues `message` on the broker connection.
    pub async fn publish(&self, message: Outgoing) -> Result<(), String> {
        // Cloned out, so no lock is held across the await.
        let client = self.lock().clone();
        match client {
            Some(client) => client.publish(message).await,
            None => Err("no MQTT source is configured to carry commands".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::model::CommandState;

    fn command() -> CommandRecord {
        CommandRecord {
            id: "c1".into(),
            tenant_id: "acme".into(),
            device_id: "a84041000181c061".into(),
            product: "lht65".into(),
            name: "set_interval".into(),
            params: serde_json::json!({"seconds": 60}),
            state: CommandState::Sent,
            oneway: true,
            persistent: false,
            created_at: 0,
            updated_at: 0,
            timeout_ms: 10_000,
            expires_at: 0,
            reply: None,
            error: None,
            failure: None,
            downlinks: Vec::new(),
            position: None,
        }
    }

    fn downlink() -> Downlink {
        Downlink {
            payload: vec![0x01, 0x00, 0x00, 0x3c],
            fport: Some(2),
            ..Downlink::default()
        }
    }

    #[test]
    fn mqtt_fills_the_template_and_a_downlink_topic_wins() {
        let transport = TransportConfig::default();
        let publish = transport.publish_of(&command(), &downlink(), None).unwrap();
        assert_eq!(publish.topic, "devices/lht65/a84041000181c061/command");
        assert_eq!((publish.qos, publish.payload), (1, vec![1, 0, 0, 0x3c]));
        let own = Downlink {
            topic: Some("x/y".into()),
            qos: Some(0),
            ..downlink()
        };
        let publish = transport.publish_of(&command(), &own, None).unwrap();
        assert_eq!((publish.topic.as_str(), publish.qos), ("x/y", 0));
    }

    #[test]
    fn chirpstack_v4_downlinks_have_its_topic_and_fields() {
        let transport = TransportConfig::Chirpstack {
            application: Some("b1e1c3a0-0000-4000-8000-000000000001".into()),
            fport: None,
            qos: 1,
        };
        let publish = transport.publish_of(&command(), &downlink(), None).unwrap();
        assert_eq!(
            publish.topic,
            "application/b1e1c3a0-0000-4000-8000-000000000001/device/a84041000181c061/command/down"
        );
        let body: serde_json::Value = serde_json::from_slice(&publish.payload).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"devEui": "a84041000181c061", "confirmed": false, "fPort": 2, "data": "AQAAPA=="})
        );
    }

    #[test]
    fn the_things_stack_v3_downlinks_have_its_topic_and_fields() {
        let transport = TransportConfig::Ttn {
            application: Some("cold-chain@ttn".into()),
            fport: Some(3),
            qos: 0,
        };
        let confirmed = Downlink {
            confirmed: true,
            fport: None,
            ..downlink()
        };
        let publish = transport.publish_of(&command(), &confirmed, None).unwrap();
        assert_eq!(
            publish.topic,
            "v3/cold-chain@ttn/devices/a84041000181c061/down/push"
        );
        let body: serde_json::Value = serde_json::from_slice(&publish.payload).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"downlinks": [{"f_port": 3, "frm_payload": "AQAAPA==", "confirmed": true, "priority": "NORMAL"}]})
        );
        let no_port = TransportConfig::Ttn {
            application: Some("a".into()),
            fport: None,
            qos: 0,
        };
        assert!(no_port.publish_of(&command(), &confirmed, None).is_err());
    }

    #[test]
    fn without_a_configured_application_the_uplinks_name_it() {
        let transport = TransportConfig::Chirpstack {
            application: None,
            fport: None,
            qos: 1,
        };
        let learn = transport.learns_application().expect("it learns");
        assert_eq!(
            learn("application/app-9/device/a84041000181c061/event/up"),
            Some("app-9")
        );
        assert_eq!(learn("devices/lht65/x/telemetry"), None);
        assert!(transport.publish_of(&command(), &downlink(), None).is_err());
        let publish = transport
            .publish_of(&command(), &downlink(), Some("app-9"))
            .unwrap();
        assert_eq!(
            publish.topic,
            "application/app-9/device/a84041000181c061/command/down"
        );
        let ttn = TransportConfig::Ttn {
            application: None,
            fport: None,
            qos: 0,
        };
        let learn = ttn.learns_application().expect("it learns");
        assert_eq!(
            learn("v3/cold-chain@ttn/devices/lht-1/up"),
            Some("cold-chain@ttn")
        );
        assert_eq!(learn("v3//devices/lht-1/up"), None);
        assert!(TransportConfig::default().learns_application().is_none());
    }

    #[test]
    fn bad_settings_are_named() {
        let wildcard = TransportConfig::Mqtt {
            topic: "devices/+/cmd".into(),
            qos: 1,
        };
        assert!(wildcard.check().unwrap_err().contains("wildcard"));
        let port = TransportConfig::Chirpstack {
            application: Some("app".into()),
            fport: Some(0),
            qos: 1,
        };
        assert!(port.check().unwrap_err().contains("fport 0"));
    }
}
