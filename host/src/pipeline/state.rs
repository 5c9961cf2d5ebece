//! What workers, timers and the gateway share: the device registry, the
//! product table, status, latest values, interest and the bus.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use super::shard::Sharded;
use crate::bus::{Bus, Deadline, Interest};
use crate::devices::DeviceRegistry;
use crate::latest::LatestStore;
use crate::script::ScriptRegistry;
use crate::status::{StatusBoard, StatusMode, StatusSource};

/// Shared state of one sluice process.
pub struct PipelineState {
    /// Registered devices.
    pub registry: ArcSwap<DeviceRegistry>,
    /// Products and their scripts.
    pub scripts: Arc<ScriptRegistry>,
    /// Status of every device.
    pub status: StatusBoard,
    /// Latest values of every device.
    pub latest: LatestStore,
    /// Devices someone watches.
    pub interest: Arc<Interest>,
    /// The bus.
    pub bus: Arc<dyn Bus>,
    /// Deadlines written behind to the bus, when it shares them.
    pub deadlines: Option<SharedDeadlines>,
    /// Whether processed records are written.
    pub records: bool,
    /// Devices that sent messages, registered or not.
    pub seen: SeenDevices,
}

/// A device that sent messages here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The product its messages were routed to.
    pub product: Arc<str>,
    /// When its last message arrived, ms since the Unix epoch.
    pub last_seen_ms: i64,
}

/// Every device that sent messages to this instance, with its product:
/// the status topic names only the device, so its mode comes from here
/// when the registry does not know it.
#[derive(Debug)]
pub struct SeenDevices {
    shards: Sharded<HashMap<String, Seen>>,
}

impl SeenDevices {
    /// An empty table in `shards`.
    pub fn new(shards: usize) -> Self {
        SeenDevices {
            shards: Sharded::new(shards, HashMap::new),
        }
    }

    /// Notes a message from `device` of `product`.
    pub fn note(&self, device: &str, product: &str, at_ms: i64) {
        let mut shard = self.shards.for_device(device);
        match shard.get_mut(device) {
            Some(seen) => {
                if &*seen.product != product {
                    seen.product = product.into();
                }
                seen.last_seen_ms = seen.last_seen_ms.max(at_ms);
            }
            None => {
                shard.insert(
                    device.to_owned(),
                    Seen {
                        product: product.into(),
                        last_seen_ms: at_ms,
                    },
                );
            }
        }
    }

    /// What is known of `device`.
    pub fn get(&self, device: &str) -> Option<Seen> {
        self.shards.for_device(device).get(device).cloned()
    }

    /// How many devices were seen.
    pub fn len(&self) -> usize {
        self.shards.each().map(|s| s.len()).sum()
    }

    /// Whether none was.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every device seen, with what is known of it.
    pub fn all(&self) -> Vec<(String, Seen)> {
        self.shards
            .each()
            .flat_map(|s| {
                s.iter()
                    .map(|(d, seen)| (d.clone(), seen.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

impl std::fmt::Debug for PipelineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineState")
            .field("bus", &self.bus.kind())
            .finish_non_exhaustive()
    }
}

impl PipelineState {
    /// The status mode of `device`: its registry override, else its
    /// product's, else `message`.
    pub fn mode_of(&self, device: &str, product: &str) -> StatusMode {
        let registry = self.registry.load();
        let registered = registry.get(device);
        if let Some(mode) = registered.and_then(|d| d.status) {
            return mode;
        }
        let product = registered.map_or(product, |d| d.product.as_str());
        self.scripts
            .get(product)
            .map(|p| p.mode)
            .unwrap_or_default()
    }

    /// The tenant of `device` (empty when unregistered).
    pub fn tenant_of(&self, device: &str) -> String {
        self.registry
            .load()
            .get(device)
            .map(|d| d.tenant.clone())
            .unwrap_or_default()
    }

    /// The name of `device` (its id when unregistered).
    pub fn name_of(&self, device: &str) -> String {
        self.registry
            .load()
            .get(device)
            .map_or_else(|| device.to_owned(), |d| d.display_name().to_owned())
    }

    /// The product of `device`: from the registry, else from its messages.
    pub fn product_of(&self, device: &str) -> Option<String> {
        match self.registry.load().get(device) {
            Some(registered) => Some(registered.product.clone()),
            None => self.seen.get(device).map(|s| s.product.to_string()),
        }
    }
}

#[derive(Debug, Default)]
struct DeadlineShard {
    /// The deadline last handed to the bus, per device.
    written: HashMap<String, i64>,
    /// Deadlines not yet written.
    pending: HashMap<String, Deadline>,
}

/// Deadlines shared through the bus, written behind and coalesced: a
/// device's deadline is written again only when its true deadline passes
/// the one written, and then with `slack` to spare, so a device reporting
/// every second costs one write per `slack`, and goes offline at most
/// `slack` late, never early.
#[derive(Debug)]
pub struct SharedDeadlines {
    shards: Sharded<DeadlineShard>,
    slack_divisor: u32,
    max_slack: Duration,
    min_slack: Duration,
}

impl SharedDeadlines {
    /// Deadlines in `shards`; slack is a tenth of the silence allowed,
    /// between `min_slack` and 30 s.
    pub fn new(shards: usize, min_slack: Duration) -> Self {
        SharedDeadlines {
            shards: Sharded::new(shards, DeadlineShard::default),
            slack_divisor: 10,
            max_slack: Duration::from_secs(30),
            min_slack,
        }
    }

    /// A message from `device` under `mode` at `wall_ms`; `offline` when it
    /// was an explicit offline signal (timeout mode cancels the deadline).
    pub fn note(&self, device: &str, mode: StatusMode, offline: bool, wall_ms: i64) {
        let (silence, source) = match mode {
            StatusMode::Message => return,
            StatusMode::Heartbeat { interval } => (interval, StatusSource::HeartbeatExpired),
            StatusMode::Timeout { after } => (after, StatusSource::TimeoutExpired),
        };
        let mut shard = self.shards.for_device(device);
        if offline && source == StatusSource::TimeoutExpired {
            shard.written.remove(device);
            shard.pending.insert(
                device.to_owned(),
                Deadline {
                    device: device.to_owned(),
                    at_ms: 0,
                    source,
                },
            );
            return;
        }
        let due = wall_ms.saturating_add(millis(silence));
        if shard
            .written
            .get(device)
            .is_some_and(|&written| due <= written)
        {
            return;
        }
        let slack = (silence / self.slack_divisor).clamp(self.min_slack, self.max_slack);
        let at_ms = due.saturating_add(millis(slack));
        shard.written.insert(device.to_owned(), at_ms);
        shard.pending.insert(
            device.to_owned(),
            Deadline {
                device: device.to_owned(),
                at_ms,
                source,
            },
        );
    }

    /// Takes the deadlines to write.
    pub fn take_pending(&self) -> Vec<Deadline> {
        self.shards
            .each()
            .flat_map(|mut s| {
                std::mem::take(&mut s.pending)
                    .into_values()
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Puts back deadlines the bus did not take, unless newer ones are pending.
    pub fn restore_pending(&self, deadlines: Vec<Deadline>) {
        for deadline in deadlines {
            let mut shard = self.shards.for_device(&deadline.device);
            shard
                .pending
                .entry(deadline.device.clone())
                .or_insert(deadline);
        }
    }

    /// Forgets what was written for `device` (its deadline was swept).
    pub fn forget(&self, device: &str) {
        self.shards.for_device(device).written.remove(device);
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_are_written_when_they_pass_the_written_one() {
        let deadlines = SharedDeadlines::new(2, Duration::from_millis(100));
        let mode = StatusMode::Heartbeat {
            interval: Duration::from_secs(60),
        };
        deadlines.note("d", mode, false, 0);
        let first = deadlines.take_pending();
        assert_eq!(
            first,
            [Deadline {
                device: "d".into(),
                at_ms: 66_000,
                source: StatusSource::HeartbeatExpired
            }]
        );
        for second in 1..=6 {
            deadlines.note("d", mode, false, second * 1000);
        }
        assert!(
            deadlines.take_pending().is_empty(),
            "within the slack: no write"
        );
        deadlines.note("d", mode, false, 7000);
        assert_eq!(deadlines.take_pending()[0].at_ms, 73_000);
    }

    #[test]
    fn explicit_offline_cancels_a_timeout_deadline() {
        let deadlines = SharedDeadlines::new(1, Duration::from_millis(100));
        let mode = StatusMode::Timeout {
            after: Duration::from_secs(10),
        };
        deadlines.note("d", mode, false, 0);
        deadlines.note("d", mode, true, 500);
        let pending = deadlines.take_pending();
        assert_eq!(pending[0].at_ms, 0);
        deadlines.note("d", StatusMode::Message, false, 600);
        assert!(deadlines.take_pending().is_empty());
    }
}
