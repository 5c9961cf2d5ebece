//! Device commands, the way back to devices: a caller's command is encoded
//! by the product's script, sent as downlinks (MQTT topic, ChirpStack v4,
//! The Things Stack v3) or queued for an offline device, and followed
//! through queued → sent → replied | failed | expired.
//!
//! - [`model`]: the command's record and states;
//! - [`store`]: where records, deadlines and queues are kept
//!   ([`MemoryCommands`]; [`RedisCommands`] in [`redis`]);
//! - [`transport`]: the MQTT message each downlink becomes;
//! - [`service`]: [`Commands`], which accepts, sends and follows them.

pub mod model;
pub mod redis;
pub mod service;
pub mod store;
pub mod transport;

pub use model::{CommandError, CommandRecord, CommandState, Failure};
pub use redis::RedisCommands;
pub use service::{CommandRequest, Commands};
pub use store::{CommandStore, MemoryCommands};
pub use transport::{MqttDownlinks, Outgoing, TransportConfig};
