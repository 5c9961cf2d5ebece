//! What workers, timers and the gateway share: the device registry, the
//! product table, status, latest values, interest and the bus.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;

use super::shard::Sharded;
use crate::bus::{Bus, Deadline, Interest};
use crate::devices::DeviceRegistry;
use crate::latest::LatestStore;
use crate::script::ScriptRegistry;
use crate::status::{StatusBoard, StatusMode, StatusSource};
use crate::supervisor::Supervisor;

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
    /// Devices outside the registry that sent messages.
    pub seen: SeenDevices,
    /// The supervised tasks and how they fare.
    pub tasks: Arc<Supervisor>,
    /// Device commands.
    pub commands: Arc<crate::commands::Commands>,
}

/// A device outside the registry that sent messages here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The product its messages were routed to.
    pub product: Arc<str>,
    /// When its last message arrived, ms since the Unix epoch.
    pub last_seen_ms: i64,
    /// The tenant it belongs to: the one of the caller whose HTTP ingest
    /// created it, or of the gateway whose outputs did (empty: none).
    pub tenant: Arc<str>,
}

/// Every device outside the registry that this instance keeps track of,
/// with its product (the status topic names only the device, so its mode
/// comes from here), up to a documented number: ids are chosen by
/// senders, so the table is bounded, and devices past the bound are
/// refused (counted), never silently tracked.
#[derive(Debug)]
pub struct SeenDevices {
    shards: Sharded<HashMap<String, Seen>>,
    count: AtomicUsize,
    limit: usize,
}

impl SeenDevices {
    /// An empty table in `shards`, holding at most `limit` devices.
    pub fn new(shards: usize, limit: usize) -> Self {
        SeenDevices {
            shards: Sharded::new(shards, HashMap::new),
            count: AtomicUsize::new(0),
            limit,
        }
    }

    /// Notes a message from unregistered `device` of `product`; a new
    /// device belongs to `tenant`. False when the device is new and the
    /// table is full (the message is refused).
    pub fn admit(&self, device: &str, product: &str, at_ms: i64, tenant: &str) -> bool {
        let mut shard = self.shards.for_device(device);
        match shard.get_mut(device) {
            Some(seen) => {
                if &*seen.product != product {
                    seen.product = product.into();
                }
                seen.last_seen_ms = seen.last_seen_ms.max(at_ms);
                true
            }
            None => {
                let taken = self
                    .count
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < self.limit).then_some(n + 1)
                    });
                if taken.is_err() {
                    metrics::counter!("sluice_devices_refused_total").increment(1);
                    return false;
                }
                shard.insert(
                    device.to_owned(),
                    Seen {
                        product: product.into(),
                        last_seen_ms: at_ms,
                        tenant: tenant.into(),
                    },
                );
                metrics::gauge!("sluice_unregistered_devices").increment(1.0);
                true
            }
        }
    }

    /// Forgets devices the registry now knows (they no longer count).
    pub fn forget_registered(&self, registry: &DeviceRegistry) {
        for mut shard in self.shards.each() {
            let before = shard.len();
            shard.retain(|device, _| registry.get(device).is_none());
            let gone = before - shard.len();
            self.count.fetch_sub(gone, Ordering::AcqRel);
            metrics::gauge!("sluice_unregistered_devices").decrement(gone as f64);
        }
    }

    /// What is known of `device`.
    pub fn get(&self, device: &str) -> Option<Seen> {
        self.shards.for_device(device).get(device).cloned()
    }

    /// How many devices are tracked.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every device tracked, with what is known of it.
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

    /// The tenant of `device`: the registry's, else the one it was
    /// admitted into (empty when none).
    pub fn tenant_of(&self, device: &str) -> String {
        match self.registry.load().get(device) {
            Some(registered) => registered.tenant.clone(),
            None => self
                .seen
                .get(device)
                .map(|s| s.tenant.to_string())
                .unwrap_or_default(),
        }
    }

    /// The watched groups `device` is a member of, and all its groups, from
    /// the registry as it is now (nothing when no group is watched).
    pub fn watched_groups(&self, device: &str) -> (Vec<String>, Vec<String>) {
        if !self.interest.any_groups() {
            return (Vec::new(), Vec::new());
        }
        let member_of = self.groups_of(device);
        (self.interest.watched_groups(&member_of), member_of)
    }

    /// The groups of `device` in the registry as it is now.
    pub fn groups_of(&self, device: &str) -> Vec<String> {
        self.registry
            .load()
            .get(device)
            .map(|d| d.groups.clone())
            .unwrap_or_default()
    }

    /// The name of `device` (its id when unregistered).
    pub fn name_of(&self, device: &str) -> String {
        self.registry
            .load()
            .get(device)
            .map_or_else(|| device.to_owned(), |d| d.display_name().to_owned())
    }

    /// Whether `device` may be tracked: registered, or admitted as one of
    /// the unregistered devices this instance keeps (see [`SeenDevices`]),
    /// belonging to `tenant` when it is new.
    pub fn admit(&self, device: &str, product: &str, at_ms: i64, tenant: &str) -> bool {
        self.registry.load().get(device).is_some()
            || self.seen.admit(device, product, at_ms, tenant)
    }

    /// Whether the outputs of `reporter` (of `product`) may write `target`:
    /// its declared child (`parent = reporter` in the registry), or, when
    /// the product's `children = "same_tenant"`, a device of its tenant (a
    /// device no one knows yet then joins that tenant).
    pub fn may_write(&self, reporter: &str, product: &str, target: &str) -> bool {
        let registry = self.registry.load();
        let registered = registry.get(target);
        if registered.is_some_and(|d| d.parent.as_deref() == Some(reporter)) {
            return true;
        }
        let same_tenant = self
            .scripts
            .get(product)
            .is_some_and(|p| p.children == crate::config::Children::SameTenant);
        if !same_tenant {
            return false;
        }
        let tenant = self.tenant_of(reporter);
        match (registered, self.seen.get(target)) {
            (Some(device), _) => device.tenant == tenant,
            (None, Some(seen)) => *seen.tenant == *tenant,
            (None, None) => true,
        }
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
    /// The deadline last handed to the bus, per device, and the source its
    /// expiry carries.
    written: HashMap<String, (i64, StatusSource)>,
    /// Deadlines not yet written.
    pending: HashMap<String, Deadline>,
}

/// Deadlines shared through the bus, written behind: each device's exact
/// deadline (its last message plus the silence its mode allows) reaches
/// the bus within one flush, several messages of one flush period in one
/// write. The sweep takes a deadline only once it is a flush old, so a
/// refresh still being written is never overtaken, and an offline comes
/// at most one flush (plus one sweep tick) after the deadline.
#[derive(Debug)]
pub struct SharedDeadlines {
    shards: Sharded<DeadlineShard>,
}

impl SharedDeadlines {
    /// Deadlines in `shards`.
    pub fn new(shards: usize) -> Self {
        SharedDeadlines {
            shards: Sharded::new(shards, DeadlineShard::default),
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
            .is_some_and(|&(written, _)| due <= written)
        {
            return;
        }
        shard.written.insert(device.to_owned(), (due, source));
        shard.pending.insert(
            device.to_owned(),
            Deadline {
                device: device.to_owned(),
                at_ms: due,
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

    /// Writes every deadline again with the next write-behind: after the
    /// bus lost them (Redis restarted empty), a device that stays silent
    /// still goes offline on time. A deadline the bus still has is not
    /// moved (writes never move one back).
    pub fn rewrite_all(&self) {
        for mut shard in self.shards.each() {
            let DeadlineShard { written, pending } = &mut *shard;
            for (device, &(at_ms, source)) in written.iter() {
                pending.entry(device.clone()).or_insert_with(|| Deadline {
                    device: device.clone(),
                    at_ms,
                    source,
                });
            }
        }
    }

    /// How many devices have a deadline written or waiting.
    pub fn len(&self) -> usize {
        self.shards.each().map(|s| s.written.len()).sum()
    }

    /// Whether none has.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_deadlines_are_written_once_per_flush() {
        let deadlines = SharedDeadlines::new(2);
        let mode = StatusMode::Heartbeat {
            interval: Duration::from_secs(60),
        };
        deadlines.note("d", mode, false, 0);
        deadlines.note("d", mode, false, 500);
        assert_eq!(
            deadlines.take_pending(),
            [Deadline {
                device: "d".into(),
                at_ms: 60_500,
                source: StatusSource::HeartbeatExpired
            }],
            "two messages of one flush period: one write of the later deadline"
        );
        assert!(deadlines.take_pending().is_empty());
        deadlines.note("d", mode, false, 400);
        assert!(
            deadlines.take_pending().is_empty(),
            "an older message never moves the deadline back"
        );
        deadlines.rewrite_all();
        assert_eq!(
            deadlines.take_pending()[0].at_ms,
            60_500,
            "written again after the bus lost it"
        );
    }

    #[test]
    fn explicit_offline_cancels_a_timeout_deadline() {
        let deadlines = SharedDeadlines::new(1);
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
