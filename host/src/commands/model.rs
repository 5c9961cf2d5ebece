//! A command's record, its states and what callers and dashboards see of it.

use serde::{Deserialize, Serialize};

use crate::script::Downlink;

/// Where a command is in its life: queued → sent → replied | failed |
/// expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandState {
    /// Kept for a device that is offline; sent when it next reports or
    /// comes online.
    Queued,
    /// Handed to the transport; a two-way command waits for the device's
    /// reply.
    Sent,
    /// The device answered that it did what was asked.
    Replied,
    /// The device answered that it failed, the reply did not come in time,
    /// or the downlink could not be handed to the transport.
    Failed,
    /// A queued command whose device did not report before its expiry.
    Expired,
}

impl CommandState {
    /// The lower-case name, as in JSON and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandState::Queued => "queued",
            CommandState::Sent => "sent",
            CommandState::Replied => "replied",
            CommandState::Failed => "failed",
            CommandState::Expired => "expired",
        }
    }

    /// The state named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "queued" => CommandState::Queued,
            "sent" => CommandState::Sent,
            "replied" => CommandState::Replied,
            "failed" => CommandState::Failed,
            "expired" => CommandState::Expired,
            _ => return None,
        })
    }

    /// Whether nothing more happens to the command.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            CommandState::Replied | CommandState::Failed | CommandState::Expired
        )
    }
}

/// Why a command failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// The device's reply did not come within the timeout.
    TimedOut,
    /// The device answered that it failed.
    Device,
    /// A downlink could not be handed to the transport.
    Send,
}

/// Everything sluice keeps of one command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandRecord {
    /// sluice's id (a random 128-bit value in hex).
    pub id: String,
    /// The tenant of the device (empty for devices without one).
    pub tenant_id: String,
    /// The device it is for.
    pub device_id: String,
    /// The device's product.
    pub product: String,
    /// The command's name.
    pub name: String,
    /// The caller's params, a JSON object.
    pub params: serde_json::Value,
    /// Where it is now.
    pub state: CommandState,
    /// `true`: done once sent; `false`: waits for the device's reply.
    pub oneway: bool,
    /// Whether it is kept for an offline device.
    pub persistent: bool,
    /// When it was accepted (ms since the Unix epoch).
    pub created_at: i64,
    /// When its state last changed.
    pub updated_at: i64,
    /// How long a two-way command waits for its reply once sent (ms).
    pub timeout_ms: u64,
    /// When a queued command expires (ms since the Unix epoch; 0 when it
    /// is not queued).
    #[serde(default)]
    pub expires_at: i64,
    /// The device's reply values, once replied (or failed by the device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<serde_json::Value>,
    /// Why it failed or expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What kind of failure, for `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    /// What the script encoded, sent as they are.
    #[serde(default)]
    pub downlinks: Vec<Downlink>,
    /// Where this state change stands in its tenant's history, once
    /// recorded there (announced changes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<crate::bus::history::Position>,
}

impl CommandRecord {
    /// What a caller or dashboard sees: the record without its downlinks.
    pub fn view(&self) -> serde_json::Value {
        let mut view = serde_json::json!({
            "id": self.id,
            "device_id": self.device_id,
            "product": self.product,
            "name": self.name,
            "params": self.params,
            "state": self.state.as_str(),
            "oneway": self.oneway,
            "persistent": self.persistent,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "timeout_ms": self.timeout_ms,
        });
        if self.expires_at > 0 {
            view["expires_at"] = self.expires_at.into();
        }
        if let Some(reply) = &self.reply {
            view["reply"] = reply.clone();
        }
        if let Some(error) = &self.error {
            view["error"] = error.clone().into();
        }
        if let Some(failure) = self.failure {
            view["failure"] = serde_json::to_value(failure).unwrap_or_default();
        }
        if let Some(position) = &self.position {
            view["position"] = serde_json::json!(position);
        }
        view
    }

    /// Whether a caller waiting for it can be answered now: the command is
    /// final, or handed off (a one-way command sent, a persistent one
    /// queued).
    pub fn settled(&self) -> bool {
        self.state.is_final()
            || (self.state == CommandState::Sent && self.oneway)
            || self.state == CommandState::Queued
    }
}

/// A state change to apply: the new state and what comes with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The state the command moves to.
    pub state: CommandState,
    /// The reply values, for `replied` (and a device's `failed`).
    pub reply: Option<serde_json::Value>,
    /// Why, for `failed` and `expired`.
    pub error: Option<String>,
    /// What kind of failure, for `failed`.
    pub failure: Option<Failure>,
    /// When (ms since the Unix epoch).
    pub at: i64,
}

/// Why a command was not accepted, or how it ended for a waiting caller.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommandError {
    /// No such device for this caller (another tenant's device looks the same).
    #[error("device {0:?} is not known")]
    UnknownDevice(String),
    /// The device's product does not accept commands.
    #[error("product {product:?} does not accept commands (its script has no `encode`)")]
    NotSupported {
        /// The product.
        product: String,
    },
    /// The script refused the command (an unknown name, bad params), or
    /// failed on it.
    #[error("the script refused the command: {code}: {message}")]
    Encode {
        /// The script's code, such as `unknown-command`, or the engine's
        /// kind of failure (`trap`, `timeout`).
        code: String,
        /// What it said.
        message: String,
    },
    /// The request itself is wrong (an empty name, params not an object, a
    /// timeout beyond the bound).
    #[error("{0}")]
    Invalid(String),
    /// No command of that id for this caller.
    #[error("command {0:?} is not known")]
    UnknownCommand(String),
    /// The device queues as many commands as allowed.
    #[error("device {device:?} already has {limit} queued commands")]
    QueueFull {
        /// The device.
        device: String,
        /// The bound.
        limit: usize,
    },
    /// The store of commands (Redis) cannot be reached.
    #[error("commands are unavailable: {0}")]
    Unavailable(String),
    /// sluice is shutting down.
    #[error("sluice is shutting down")]
    Closed,
}
