//! The hub of one instance: which local WebSocket clients watch which
//! devices, and the one way publications reach them.
//!
//! With Redis, the hub holds one subscriber connection and SUBSCRIBEs those
//! of a device's channels (telemetry, status, alerts, events) its local
//! watchers want, UNSUBSCRIBEs what none wants any more; it keeps
//! `ws:sub:{device}` as the contract says (INCR per watching client, DECR
//! when it leaves, EXPIRE 300 s refreshed every 120 s) and announces
//! devices' first and last watchers on `sluice:interest`, so every
//! publisher's interest mirror follows. Many devices are watched in one
//! pipelined round trip of counts and a few SUBSCRIBEs, not two round
//! trips per device.
//! When the subscriber connection comes back (Redis restarted, even
//! empty), every watched device is subscribed again and its count put
//! back. With the in-process bus, the same hub takes publications from the
//! process and keeps the interest set itself.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use redis::Script;
use redis::aio::PubSubSink;
use tokio::sync::{broadcast, watch};

use super::frames::Rendered;
use crate::bus::{
    BusError, GROUP_PATTERN, GROUP_WATCH_PREFIX, INTEREST_CHANNEL, Interest, MemoryBus,
    Publication, Reconnect, RedisTarget,
};
use crate::supervisor::Supervisor;

/// How long a watcher count lives without a refresh.
pub const WATCH_TTL_SECS: u64 = 300;
/// How often held watcher counts are refreshed.
pub const WATCH_REFRESH: Duration = Duration::from_secs(120);
/// Devices per Redis round trip when many are watched at once.
const CHUNK: usize = 500;
/// How often a lost count restore is tried again.
const RESTORE_RETRY: Duration = Duration::from_millis(500);
/// Watching this many groups, an instance takes every group channel with
/// one pattern (`PSUBSCRIBE ws:group*`) instead of one SUBSCRIBE each;
/// below half of it, it goes back to one channel per group.
pub const GROUP_PATTERN_AT: usize = 1000;

/// INCRBY each watcher count and set its TTL; announce the devices (or
/// groups) whose first watcher came in one event. KEYS: ws:sub:{device}…
/// (or ws:sub:group:{group}…). ARGV: ttl, interest channel, the event's
/// field (`devices` or `groups`), then per key its count and its name.
const WATCH_LUA: &str = r"
local first = {}
for i, key in ipairs(KEYS) do
  local count = tonumber(ARGV[2 + 2 * i])
  local n = redis.call('INCRBY', key, count)
  redis.call('EXPIRE', key, ARGV[1])
  if n == count then table.insert(first, ARGV[3 + 2 * i]) end
end
if #first > 0 then
  local event = {watched = true}
  event[ARGV[3]] = first
  redis.call('PUBLISH', ARGV[2], cjson.encode(event))
end
return #first
";

/// DECRBY each watcher count, deleting it at zero; announce the devices
/// whose last watcher left in one event. Same KEYS and ARGV as
/// [`WATCH_LUA`].
const UNWATCH_LUA: &str = r"
local last = {}
for i, key in ipairs(KEYS) do
  local n = redis.call('DECRBY', key, ARGV[2 + 2 * i])
  if n <= 0 then
    redis.call('DEL', key)
    table.insert(last, ARGV[3 + 2 * i])
  else
    redis.call('EXPIRE', key, ARGV[1])
  end
end
if #last > 0 then
  local event = {watched = false}
  event[ARGV[3]] = last
  redis.call('PUBLISH', ARGV[2], cjson.encode(event))
end
return #last
";

/// Refresh each TTL; a count that is gone (expired, or Redis restarted
/// empty) is put back with this instance's count, and those devices are
/// announced in one event. Same KEYS and ARGV as [`WATCH_LUA`].
const REFRESH_LUA: &str = r"
local back = {}
for i, key in ipairs(KEYS) do
  if redis.call('EXPIRE', key, ARGV[1]) == 0 then
    redis.call('INCRBY', key, ARGV[2 + 2 * i])
    redis.call('EXPIRE', key, ARGV[1])
    table.insert(back, ARGV[3 + 2 * i])
  end
end
if #back > 0 then
  local event = {watched = true}
  event[ARGV[3]] = back
  redis.call('PUBLISH', ARGV[2], cjson.encode(event))
end
return #back
";

/// Which of a device's channels a watcher wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Kinds(u8);

impl Kinds {
    /// Telemetry reports.
    pub const TELEMETRY: Kinds = Kinds(1);
    /// Status changes.
    pub const STATUS: Kinds = Kinds(2);
    /// Alerts.
    pub const ALERTS: Kinds = Kinds(4);
    /// Events.
    pub const EVENTS: Kinds = Kinds(8);
    /// Nothing.
    pub const NONE: Kinds = Kinds(0);

    /// Both sets.
    pub fn union(self, other: Kinds) -> Kinds {
        Kinds(self.0 | other.0)
    }

    /// Whether nothing is wanted.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The kind of `publication`.
    pub fn of(publication: &Publication) -> Kinds {
        match publication {
            Publication::Telemetry(_) => Kinds::TELEMETRY,
            Publication::Status(_) => Kinds::STATUS,
            Publication::Alert(_) => Kinds::ALERTS,
            Publication::Event(_) => Kinds::EVENTS,
            // Announced by the commands service, never through the hub.
            Publication::Command(_) => Kinds::NONE,
        }
    }

    fn contains(self, other: Kinds) -> bool {
        self.0 & other.0 == other.0 && !other.is_empty()
    }

    /// The channels of `device` these kinds name.
    fn channels(self, device: &str) -> impl Iterator<Item = String> + '_ {
        let all = Publication::channels(device);
        [
            Kinds::TELEMETRY,
            Kinds::STATUS,
            Kinds::ALERTS,
            Kinds::EVENTS,
        ]
        .into_iter()
        .zip(all)
        .filter(move |(kind, _)| self.contains(*kind))
        .map(|(_, channel)| channel)
    }
}

/// Something that takes publications about the devices it watches.
pub trait Watcher: Send + Sync {
    /// A publication about a watched device, with frame parts shared by
    /// every watcher; must not block.
    fn deliver(&self, publication: &Rendered<'_>);

    /// A publication about a member of `group`, which the watcher watches
    /// as a whole; must not block.
    fn deliver_group(&self, _group: &str, _publication: &Rendered<'_>) {}

    /// The hub lost its subscriber connection to Redis: what is published
    /// until [`Watcher::resumed`] does not reach the watcher. Must not block.
    fn interrupted(&self) {}

    /// The hub delivers again after [`Watcher::interrupted`]; what was
    /// published in between was not delivered. Must not block.
    fn resumed(&self) {}
}

/// A watcher's handle in the hub.
pub type WatcherId = u64;

/// One local watcher of a device, and the kinds it wants.
#[derive(Clone)]
struct Held {
    watcher: Arc<dyn Watcher>,
    kinds: Kinds,
}

#[derive(Default)]
struct Table {
    /// Device → its local watchers.
    devices: HashMap<String, HashMap<WatcherId, Held>>,
    /// Group → its local watchers (of the group as a whole).
    groups: HashMap<String, HashMap<WatcherId, Arc<dyn Watcher>>>,
}

impl Table {
    /// The kinds some local watcher of `device` wants.
    fn wanted(&self, device: &str) -> Kinds {
        self.devices.get(device).map_or(Kinds::NONE, |watchers| {
            watchers
                .values()
                .fold(Kinds::NONE, |kinds, held| kinds.union(held.kinds))
        })
    }
}

struct RedisSide {
    /// Where counts are kept (the master, through failovers).
    target: RedisTarget,
    /// The subscriber connection's command half, while connected.
    sink: tokio::sync::Mutex<Option<PubSubSink>>,
    /// Devices whose channels the subscriber connection holds, and which.
    subscribed: Mutex<HashMap<String, Kinds>>,
    /// Groups whose channel the subscriber connection holds.
    subscribed_groups: Mutex<std::collections::HashSet<String>>,
    /// Whether the subscriber connection holds the pattern of every group
    /// channel ([`GROUP_PATTERN_AT`]).
    group_pattern: Mutex<bool>,
    watch: Script,
    unwatch: Script,
    refresh: Script,
}

/// The hub of one instance.
pub struct Hub {
    table: Mutex<Table>,
    next_id: AtomicU64,
    interest: Arc<Interest>,
    redis: Option<RedisSide>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("devices", &self.watched_devices())
            .field("redis", &self.redis.is_some())
            .finish()
    }
}

/// A device or group, and how many local watchers it has.
type HeldCount = (String, usize);

/// What a count is of: a device (`ws:sub:{device}`, announced as
/// `devices`) or a group (`ws:sub:group:{group}`, announced as `groups`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counted {
    Devices,
    Groups,
}

impl Counted {
    fn key(self, name: &str) -> String {
        match self {
            Counted::Devices => format!("ws:sub:{name}"),
            Counted::Groups => format!("{GROUP_WATCH_PREFIX}{name}"),
        }
    }

    fn field(self) -> &'static str {
        match self {
            Counted::Devices => "devices",
            Counted::Groups => "groups",
        }
    }
}

/// The pattern of every group channel.
fn group_pattern() -> String {
    GROUP_PATTERN.to_owned()
}

/// The channels of `groups`: each member's publications once, with `group`.
fn group_channels(groups: &[String]) -> Vec<String> {
    groups
        .iter()
        .flat_map(|g| Publication::group_channels(g))
        .collect()
}

fn unavailable(error: redis::RedisError) -> BusError {
    BusError::Unavailable(error.to_string())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Held for a few map operations, never across an await.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Hub {
    /// A hub fed by the in-process bus.
    pub fn in_process(
        interest: Arc<Interest>,
        bus: Arc<MemoryBus>,
        tasks: &Arc<Supervisor>,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Hub> {
        let hub = Arc::new(Hub {
            table: Mutex::default(),
            next_id: AtomicU64::new(1),
            interest,
            redis: None,
        });
        let (relay, stop) = (hub.clone(), shutdown.clone());
        tasks.spawn("hub relay", shutdown, move || {
            relay_in_process(
                relay.clone(),
                bus.subscribe(),
                bus.subscribe_groups(),
                stop.clone(),
            )
        });
        hub
    }

    /// A hub fed by Redis through one subscriber connection.
    pub fn with_redis(
        target: RedisTarget,
        interest: Arc<Interest>,
        tasks: &Arc<Supervisor>,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Hub> {
        let hub = Arc::new(Hub {
            table: Mutex::default(),
            next_id: AtomicU64::new(1),
            interest,
            redis: Some(RedisSide {
                target: target.clone(),
                sink: tokio::sync::Mutex::new(None),
                subscribed: Mutex::default(),
                subscribed_groups: Mutex::default(),
                group_pattern: Mutex::default(),
                watch: Script::new(WATCH_LUA),
                unwatch: Script::new(UNWATCH_LUA),
                refresh: Script::new(REFRESH_LUA),
            }),
        });
        let (relay, stop) = (hub.clone(), shutdown.clone());
        tasks.spawn("hub relay", shutdown.clone(), move || {
            relay_redis(relay.clone(), target.clone(), stop.clone())
        });
        let (refresher, stop) = (hub.clone(), shutdown.clone());
        tasks.spawn("watch refresh", shutdown, move || {
            refresh_watches(refresher.clone(), stop.clone())
        });
        hub
    }

    /// A new watcher id.
    pub fn register(&self) -> WatcherId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Devices some local client watches.
    pub fn watched_devices(&self) -> usize {
        lock(&self.table).devices.len()
    }

    /// `watcher` (under `id`) watches `device`'s channels of `kinds` from
    /// now on. Returns once publications about it can reach this instance.
    pub async fn watch(
        &self,
        id: WatcherId,
        watcher: Arc<dyn Watcher>,
        device: &str,
        kinds: Kinds,
    ) -> Result<(), BusError> {
        self.watch_many(id, watcher, &[(device.to_owned(), kinds)])
            .await
    }

    /// `watcher` (under `id`) watches each device's channels of its kinds
    /// from now on (replacing the kinds it watched before), in one
    /// pipelined round trip of counts and a few SUBSCRIBEs. Returns once
    /// publications about them can reach this instance; on failure, the
    /// devices it did not watch before are not watched or counted.
    pub async fn watch_many(
        &self,
        id: WatcherId,
        watcher: Arc<dyn Watcher>,
        devices: &[(String, Kinds)],
    ) -> Result<(), BusError> {
        if devices.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        // The devices this watcher is new to: counted once each in Redis.
        let new: Vec<String> = {
            let mut table = lock(&self.table);
            devices
                .iter()
                .filter_map(|(device, kinds)| {
                    let watchers = table.devices.entry(device.clone()).or_default();
                    let held = Held {
                        watcher: watcher.clone(),
                        kinds: *kinds,
                    };
                    watchers.insert(id, held).is_none().then(|| device.clone())
                })
                .collect()
        };
        self.interest.set_many(new.iter().map(String::as_str), true);
        let tabled = started.elapsed();
        let Some(redis) = &self.redis else {
            return Ok(());
        };
        let counted = counts_pipeline(
            &redis.watch,
            Counted::Devices,
            new.iter().map(|d| (d.as_str(), 1)),
        )
        .query_async::<()>(&mut redis.target.connection())
        .await;
        if let Err(error) = counted {
            // Not counted in Redis, so not held here either: a later
            // unwatch must not take away another client's count. (A reply
            // lost after Redis counted leaves counts that expire with their
            // TTL.)
            let last = self.forget(id, &new);
            if let Err(error) = self.reconcile(&last).await {
                tracing::debug!(%error, "channels are dropped when the subscriber connection returns");
            }
            return Err(unavailable(error));
        }
        let counted_at = started.elapsed();
        let names: Vec<String> = devices.iter().map(|(d, _)| d.clone()).collect();
        if let Err(error) = self.reconcile(&names).await {
            self.release_new(id, &new).await;
            return Err(error);
        }
        tracing::debug!(
            devices = devices.len(),
            table_ms = tabled.as_secs_f64() * 1000.0,
            count_ms = (counted_at - tabled).as_secs_f64() * 1000.0,
            subscribe_ms = (started.elapsed() - counted_at).as_secs_f64() * 1000.0,
            "devices watched"
        );
        Ok(())
    }

    /// Undoes a failed [`Hub::watch_many`] for the devices it was new to:
    /// forgets them here, gives back their counts, and drops channels no
    /// longer wanted.
    async fn release_new(&self, id: WatcherId, new: &[String]) {
        let last = self.forget(id, new);
        if let Some(redis) = &self.redis {
            let released = counts_pipeline(
                &redis.unwatch,
                Counted::Devices,
                new.iter().map(|d| (d.as_str(), 1)),
            )
            .query_async::<()>(&mut redis.target.connection())
            .await;
            if let Err(error) = released {
                tracing::warn!(%error, "could not give back watcher counts; they expire with their TTL");
            }
        }
        if let Err(error) = self.reconcile(&last).await {
            tracing::debug!(%error, "channels are dropped when the subscriber connection returns");
        }
    }

    /// Removes `id`'s watch of `devices` from the local table only;
    /// returns the devices nobody here watches any more.
    fn forget(&self, id: WatcherId, devices: &[String]) -> Vec<String> {
        let mut table = lock(&self.table);
        let mut last = Vec::new();
        for device in devices {
            if let Some(watchers) = table.devices.get_mut(device) {
                watchers.remove(&id);
                if watchers.is_empty() {
                    table.devices.remove(device);
                    last.push(device.clone());
                }
            }
        }
        last
    }

    /// `id` no longer watches `device`.
    pub async fn unwatch(&self, id: WatcherId, device: &str) -> Result<(), BusError> {
        self.unwatch_many(id, &[device.to_owned()]).await
    }

    /// `id` no longer watches any of `devices`.
    pub async fn unwatch_many(&self, id: WatcherId, devices: &[String]) -> Result<(), BusError> {
        let (held, last) = {
            let mut table = lock(&self.table);
            let mut held = Vec::new();
            let mut last = Vec::new();
            for device in devices {
                let Some(watchers) = table.devices.get_mut(device) else {
                    continue;
                };
                if watchers.remove(&id).is_some() {
                    held.push(device.clone());
                }
                if watchers.is_empty() {
                    table.devices.remove(device);
                    last.push(device.clone());
                }
            }
            (held, last)
        };
        let Some(redis) = &self.redis else {
            self.interest
                .set_many(last.iter().map(String::as_str), false);
            return Ok(());
        };
        counts_pipeline(
            &redis.unwatch,
            Counted::Devices,
            held.iter().map(|d| (d.as_str(), 1)),
        )
        .query_async::<()>(&mut redis.target.connection())
        .await
        .map_err(unavailable)?;
        self.reconcile(&held).await
    }

    /// Gives back every count this instance holds and forgets every
    /// watcher: the last step of shutdown, for connections that did not
    /// leave by themselves.
    pub async fn release_all(&self) {
        let (held, groups): (Vec<HeldCount>, Vec<HeldCount>) = {
            let mut table = lock(&self.table);
            let held = table
                .devices
                .drain()
                .map(|(device, watchers)| (device, watchers.len()))
                .collect();
            let groups = table
                .groups
                .drain()
                .map(|(group, watchers)| (group, watchers.len()))
                .collect();
            (held, groups)
        };
        if held.is_empty() && groups.is_empty() {
            return;
        }
        let Some(redis) = &self.redis else {
            self.interest
                .set_many(held.iter().map(|(d, _)| d.as_str()), false);
            self.interest
                .set_groups(groups.iter().map(|(g, _)| g.as_str()), false);
            return;
        };
        let mut pipe = counts_pipeline(
            &redis.unwatch,
            Counted::Devices,
            held.iter().map(|(d, n)| (d.as_str(), *n)),
        );
        add_counts(
            &mut pipe,
            &redis.unwatch,
            Counted::Groups,
            groups.iter().map(|(g, n)| (g.as_str(), *n)),
        );
        let released = pipe.query_async::<()>(&mut redis.target.connection()).await;
        if let Err(error) = released {
            tracing::warn!(%error, devices = held.len(), "could not give back watcher counts at shutdown; they expire with their TTL");
            return;
        }
        tracing::info!(devices = held.len(), "watcher counts given back");
    }

    /// Brings the subscriber connection in line with the table for `devices`.
    async fn reconcile(&self, devices: &[String]) -> Result<(), BusError> {
        let Some(redis) = &self.redis else {
            return Ok(());
        };
        if devices.is_empty() {
            return Ok(());
        }
        // One reconciliation at a time: the sink lock orders them.
        let mut sink = redis.sink.lock().await;
        let Some(sink) = sink.as_mut() else {
            // Not connected: the relay subscribes everything watched when it connects.
            return Ok(());
        };
        // Per device: what to add, what to drop, and what it then holds.
        let changes: Vec<(String, Kinds, Kinds, Kinds)> = {
            let table = lock(&self.table);
            let held = lock(&redis.subscribed);
            devices
                .iter()
                .filter_map(|device| {
                    let wanted = table.wanted(device);
                    let have = held.get(device).copied().unwrap_or_default();
                    let add = Kinds(wanted.0 & !have.0);
                    let drop = Kinds(have.0 & !wanted.0);
                    (!add.is_empty() || !drop.is_empty())
                        .then(|| (device.clone(), add, drop, wanted))
                })
                .collect()
        };
        for chunk in changes.chunks(CHUNK) {
            let subscribe: Vec<String> = chunk
                .iter()
                .flat_map(|(device, add, _, _)| add.channels(device).collect::<Vec<_>>())
                .collect();
            let unsubscribe: Vec<String> = chunk
                .iter()
                .flat_map(|(device, _, drop, _)| drop.channels(device).collect::<Vec<_>>())
                .collect();
            if !subscribe.is_empty() {
                sink.subscribe(&subscribe).await.map_err(unavailable)?;
            }
            if !unsubscribe.is_empty() {
                sink.unsubscribe(&unsubscribe).await.map_err(unavailable)?;
            }
            let mut held = lock(&redis.subscribed);
            for (device, _, _, now) in chunk {
                if now.is_empty() {
                    held.remove(device);
                } else {
                    held.insert(device.clone(), *now);
                }
            }
        }
        Ok(())
    }

    /// `watcher` (under `id`) watches each of `groups` as a whole from now
    /// on: one count per group (`ws:sub:group:{group}`) and its channel of
    /// each kind (`ws:group:{group}` for telemetry), whatever the members.
    /// Returns once what members publish can reach this instance; on failure, the groups it did
    /// not watch before are not watched or counted.
    pub async fn watch_groups(
        &self,
        id: WatcherId,
        watcher: Arc<dyn Watcher>,
        groups: &[String],
    ) -> Result<(), BusError> {
        let new: Vec<String> = {
            let mut table = lock(&self.table);
            groups
                .iter()
                .filter(|group| {
                    table
                        .groups
                        .entry((*group).clone())
                        .or_default()
                        .insert(id, watcher.clone())
                        .is_none()
                })
                .cloned()
                .collect()
        };
        if new.is_empty() {
            return Ok(());
        }
        self.interest
            .set_groups(new.iter().map(String::as_str), true);
        let Some(redis) = &self.redis else {
            return Ok(());
        };
        let counted = counts_pipeline(
            &redis.watch,
            Counted::Groups,
            new.iter().map(|g| (g.as_str(), 1)),
        )
        .query_async::<()>(&mut redis.target.connection())
        .await;
        if let Err(error) = counted {
            self.forget_groups(id, &new);
            let _ = self.reconcile_groups(&new).await;
            return Err(unavailable(error));
        }
        if let Err(error) = self.reconcile_groups(&new).await {
            self.release_groups(id, &new).await;
            return Err(error);
        }
        Ok(())
    }

    /// `id` no longer watches any of `groups`.
    pub async fn unwatch_groups(&self, id: WatcherId, groups: &[String]) -> Result<(), BusError> {
        let held = self.forget_groups(id, groups);
        if held.is_empty() {
            return Ok(());
        }
        let Some(redis) = &self.redis else {
            let table = lock(&self.table);
            let last = held.iter().filter(|g| !table.groups.contains_key(*g));
            self.interest.set_groups(last.map(String::as_str), false);
            return Ok(());
        };
        counts_pipeline(
            &redis.unwatch,
            Counted::Groups,
            held.iter().map(|g| (g.as_str(), 1)),
        )
        .query_async::<()>(&mut redis.target.connection())
        .await
        .map_err(unavailable)?;
        self.reconcile_groups(&held).await
    }

    /// Undoes a failed [`Hub::watch_groups`].
    async fn release_groups(&self, id: WatcherId, groups: &[String]) {
        if let Err(error) = self.unwatch_groups(id, groups).await {
            tracing::warn!(%error, "could not give back group watcher counts; they expire with their TTL");
        }
    }

    /// Removes `id`'s watch of `groups` from the local table only; returns
    /// the groups it watched.
    fn forget_groups(&self, id: WatcherId, groups: &[String]) -> Vec<String> {
        let mut table = lock(&self.table);
        let mut held = Vec::new();
        for group in groups {
            if let Some(watchers) = table.groups.get_mut(group) {
                if watchers.remove(&id).is_some() {
                    held.push(group.clone());
                }
                if watchers.is_empty() {
                    table.groups.remove(group);
                }
            }
        }
        held
    }

    /// Brings the subscriber connection's group channels in line with the
    /// table for `groups`.
    async fn reconcile_groups(&self, groups: &[String]) -> Result<(), BusError> {
        let Some(redis) = &self.redis else {
            return Ok(());
        };
        let mut sink = redis.sink.lock().await;
        let Some(sink) = sink.as_mut() else {
            // Not connected: the relay subscribes every watched group when it connects.
            return Ok(());
        };
        let watched = lock(&self.table).groups.len();
        let pattern = *lock(&redis.group_pattern);
        if !pattern && watched >= GROUP_PATTERN_AT {
            // The pattern first, then the channels it replaces: a report
            // in between comes on both and is taken once (the relay skips
            // the pattern's copy of a group still subscribed by name).
            sink.psubscribe(group_pattern())
                .await
                .map_err(unavailable)?;
            *lock(&redis.group_pattern) = true;
            let held: Vec<String> = lock(&redis.subscribed_groups).iter().cloned().collect();
            for chunk in held.chunks(CHUNK) {
                let channels = group_channels(chunk);
                sink.unsubscribe(&channels).await.map_err(unavailable)?;
                let mut subscribed = lock(&redis.subscribed_groups);
                for group in chunk {
                    subscribed.remove(group);
                }
            }
            return Ok(());
        }
        if pattern && watched >= GROUP_PATTERN_AT / 2 {
            // The pattern covers every group, watched now or not.
            return Ok(());
        }
        if pattern {
            // Few again: one channel per watched group, then no pattern.
            let groups: Vec<String> = lock(&self.table).groups.keys().cloned().collect();
            for chunk in groups.chunks(CHUNK) {
                let channels = group_channels(chunk);
                sink.subscribe(&channels).await.map_err(unavailable)?;
                lock(&redis.subscribed_groups).extend(chunk.iter().cloned());
            }
            sink.punsubscribe(group_pattern())
                .await
                .map_err(unavailable)?;
            *lock(&redis.group_pattern) = false;
        }
        let (add, drop): (Vec<String>, Vec<String>) = {
            let table = lock(&self.table);
            let held = lock(&redis.subscribed_groups);
            let add = groups
                .iter()
                .filter(|g| table.groups.contains_key(*g) && !held.contains(*g))
                .cloned()
                .collect();
            let drop = groups
                .iter()
                .filter(|g| !table.groups.contains_key(*g) && held.contains(*g))
                .cloned()
                .collect();
            (add, drop)
        };
        if !add.is_empty() {
            let channels = group_channels(&add);
            sink.subscribe(&channels).await.map_err(unavailable)?;
        }
        if !drop.is_empty() {
            let channels = group_channels(&drop);
            sink.unsubscribe(&channels).await.map_err(unavailable)?;
        }
        let mut held = lock(&redis.subscribed_groups);
        held.extend(add);
        for group in &drop {
            held.remove(group);
        }
        Ok(())
    }

    /// Every local watcher, once.
    fn watchers(&self) -> Vec<Arc<dyn Watcher>> {
        let table = lock(&self.table);
        let mut seen = std::collections::HashSet::new();
        let held = table
            .devices
            .values()
            .flat_map(|watchers| watchers.iter().map(|(id, held)| (*id, &held.watcher)));
        let groups = table
            .groups
            .values()
            .flat_map(|watchers| watchers.iter().map(|(id, watcher)| (*id, watcher)));
        held.chain(groups)
            .filter(|(id, _)| seen.insert(*id))
            .map(|(_, watcher)| watcher.clone())
            .collect()
    }

    /// Hands `publication`, about a member of `group`, to the local
    /// watchers of the group.
    pub fn dispatch_group(&self, group: &str, publication: &Publication) {
        let watchers: Vec<Arc<dyn Watcher>> = match lock(&self.table).groups.get(group) {
            Some(watchers) => watchers.values().cloned().collect(),
            None => return,
        };
        let rendered = Rendered::new(publication);
        for watcher in watchers {
            watcher.deliver_group(group, &rendered);
        }
    }

    /// Hands `publication` to the local watchers of its device.
    pub fn dispatch(&self, publication: &Publication) {
        let kind = Kinds::of(publication);
        let watchers: Vec<Arc<dyn Watcher>> =
            match lock(&self.table).devices.get(publication.device()) {
                Some(watchers) => watchers
                    .values()
                    .filter(|held| held.kinds.contains(kind))
                    .map(|held| held.watcher.clone())
                    .collect(),
                None => return,
            };
        let rendered = Rendered::new(publication);
        for watcher in watchers {
            watcher.deliver(&rendered);
        }
    }

    /// Refreshes (or restores) the watcher counts this instance holds.
    async fn refresh(&self) -> Result<(), BusError> {
        let Some(redis) = &self.redis else {
            return Ok(());
        };
        let held: Vec<(String, usize)> = lock(&self.table)
            .devices
            .iter()
            .map(|(d, w)| (d.clone(), w.len()))
            .collect();
        let groups: Vec<(String, usize)> = lock(&self.table)
            .groups
            .iter()
            .map(|(g, w)| (g.clone(), w.len()))
            .collect();
        let mut pipe = counts_pipeline(
            &redis.refresh,
            Counted::Devices,
            held.iter().map(|(d, n)| (d.as_str(), *n)),
        );
        add_counts(
            &mut pipe,
            &redis.refresh,
            Counted::Groups,
            groups.iter().map(|(g, n)| (g.as_str(), *n)),
        );
        pipe.query_async::<()>(&mut redis.target.connection())
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

/// One round trip of `script` for `(device, count)` pairs: the script
/// loaded, then one invocation per [`CHUNK`] devices, pipelined.
fn counts_pipeline<'a>(
    script: &'a Script,
    counted: Counted,
    pairs: impl Iterator<Item = (&'a str, usize)>,
) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.load_script(script).ignore();
    add_counts(&mut pipe, script, counted, pairs);
    pipe
}

/// Appends to `pipe` one invocation of `script` (already loaded there) per
/// [`CHUNK`] of `(name, count)` pairs of `counted`.
fn add_counts<'a>(
    pipe: &mut redis::Pipeline,
    script: &'a Script,
    counted: Counted,
    pairs: impl Iterator<Item = (&'a str, usize)>,
) {
    let pairs: Vec<(&str, usize)> = pairs.collect();
    for chunk in pairs.chunks(CHUNK) {
        let mut invocation = script.prepare_invoke();
        invocation
            .arg(WATCH_TTL_SECS)
            .arg(INTEREST_CHANNEL)
            .arg(counted.field());
        for (name, count) in chunk {
            invocation.key(counted.key(name)).arg(*count).arg(*name);
        }
        pipe.invoke_script(&invocation).ignore();
    }
}

/// The wanted channels of each of `devices`.
fn channels_of(devices: &[(String, Kinds)]) -> Vec<String> {
    devices
        .iter()
        .flat_map(|(device, kinds)| kinds.channels(device).collect::<Vec<_>>())
        .collect()
}

async fn relay_in_process(
    hub: Arc<Hub>,
    mut publications: broadcast::Receiver<Arc<Publication>>,
    mut groups: broadcast::Receiver<Arc<(String, Publication)>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let lagged = |missed: u64| {
        metrics::counter!("sluice_ws_frames_dropped_total").increment(missed);
        tracing::warn!(missed, "the WebSocket hub fell behind the in-process bus");
    };
    loop {
        tokio::select! {
            received = publications.recv() => match received {
                Ok(publication) => hub.dispatch(&publication),
                Err(broadcast::error::RecvError::Lagged(missed)) => lagged(missed),
                Err(broadcast::error::RecvError::Closed) => return,
            },
            received = groups.recv() => match received {
                Ok(delivery) => hub.dispatch_group(&delivery.0, &delivery.1),
                Err(broadcast::error::RecvError::Lagged(missed)) => lagged(missed),
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// Holds the subscriber connection: connects, subscribes every watched
/// device, puts back this instance's counts, relays messages; on loss,
/// reconnects with backoff.
async fn relay_redis(hub: Arc<Hub>, target: RedisTarget, mut shutdown: watch::Receiver<bool>) {
    let mut reconnect = Reconnect::new(&target);
    let mut interrupted = false;
    loop {
        match relay_once(&hub, &mut reconnect, &mut shutdown, &mut interrupted).await {
            Ok(()) => return,
            Err(error) => {
                metrics::counter!("sluice_bus_errors_total", "op" => "hub").increment(1);
                tracing::warn!(%error, retry_in = ?reconnect.backoff(), "WebSocket hub lost Redis; reconnecting");
            }
        }
        if !interrupted {
            interrupted = true;
            for watcher in hub.watchers() {
                watcher.interrupted();
            }
        }
        if let Some(redis) = &hub.redis {
            *redis.sink.lock().await = None;
            lock(&redis.subscribed).clear();
            lock(&redis.subscribed_groups).clear();
            *lock(&redis.group_pattern) = false;
        }
        if !reconnect.pause(&mut shutdown).await {
            return;
        }
    }
}

async fn relay_once(
    hub: &Hub,
    reconnect: &mut Reconnect,
    shutdown: &mut watch::Receiver<bool>,
    interrupted: &mut bool,
) -> Result<(), redis::RedisError> {
    let Some(redis) = &hub.redis else {
        return Ok(());
    };
    let (mut sink, mut stream) = reconnect.client().get_async_pubsub().await?.split();
    {
        let mut held = redis.sink.lock().await;
        let devices: Vec<(String, Kinds)> = {
            let table = lock(&hub.table);
            table
                .devices
                .keys()
                .map(|device| (device.clone(), table.wanted(device)))
                .collect()
        };
        for chunk in devices.chunks(CHUNK) {
            sink.subscribe(channels_of(chunk)).await?;
        }
        lock(&redis.subscribed).extend(devices);
        let groups: Vec<String> = lock(&hub.table).groups.keys().cloned().collect();
        if groups.len() >= GROUP_PATTERN_AT {
            sink.psubscribe(group_pattern()).await?;
            *lock(&redis.group_pattern) = true;
        } else {
            for chunk in groups.chunks(CHUNK) {
                let channels = group_channels(chunk);
                sink.subscribe(channels).await?;
            }
            lock(&redis.subscribed_groups).extend(groups);
        }
        *held = Some(sink);
    }
    reconnect.connected();
    if std::mem::take(interrupted) {
        // Everything is subscribed again: watchers catch up on the gap.
        for watcher in hub.watchers() {
            watcher.resumed();
        }
    }
    // Counts may have expired or vanished with a restarted Redis: put them
    // back, retrying until Redis takes them.
    let mut restored = false;
    let mut retry = tokio::time::interval(RESTORE_RETRY);
    loop {
        tokio::select! {
            message = stream.next() => {
                let Some(message) = message else {
                    return Err(redis::RedisError::from((redis::ErrorKind::Io, "subscriber connection closed")));
                };
                let channel = message.get_channel_name();
                if let Some(group) = Publication::group_of(channel) {
                    if message.from_pattern() && lock(&redis.subscribed_groups).contains(group) {
                        // Also subscribed by name while the pattern comes in.
                        continue;
                    }
                    match Publication::parse_group(channel, message.get_payload_bytes()) {
                        Ok(publication) => hub.dispatch_group(group, &publication),
                        Err(error) => tracing::warn!(%error, group, "ignoring a malformed group publication"),
                    }
                    continue;
                }
                match Publication::parse(channel, message.get_payload_bytes()) {
                    Ok(publication) => hub.dispatch(&publication),
                    Err(error) => tracing::warn!(%error, "ignoring a malformed publication"),
                }
            }
            _ = retry.tick(), if !restored => {
                match hub.refresh().await {
                    Ok(()) => restored = true,
                    Err(error) => tracing::debug!(%error, "watcher counts not restored yet; retrying"),
                }
            }
            error = reconnect.moved() => return Err(error),
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

async fn refresh_watches(hub: Arc<Hub>, mut shutdown: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(WATCH_REFRESH);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                if let Err(error) = hub.refresh().await {
                    tracing::warn!(%error, "could not refresh watcher counts");
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Collect(Mutex<Vec<String>>);

    impl Watcher for Collect {
        fn deliver(&self, rendered: &Rendered<'_>) {
            self.0
                .lock()
                .unwrap()
                .push(rendered.publication.device().to_owned());
        }
    }

    #[tokio::test]
    async fn in_process_watchers_get_their_devices_and_set_interest() {
        let interest = Arc::new(Interest::new());
        let bus = Arc::new(MemoryBus::new(
            10,
            crate::bus::history::HistoryLimits::default(),
        ));
        let (_stop, stop_rx) = watch::channel(false);
        let hub = Hub::in_process(interest.clone(), bus.clone(), &Supervisor::new(), stop_rx);
        let watcher = Arc::new(Collect::default());
        let id = hub.register();
        hub.watch(id, watcher.clone(), "d1", Kinds::TELEMETRY)
            .await
            .unwrap();
        assert!(interest.is_watched("d1"));
        let report = |device: &str| {
            Publication::Telemetry(crate::bus::TelemetryReport {
                device_id: device.into(),
                tenant_id: String::new(),
                timestamp: 1,
                data: crate::script::Fields::new(),
                groups: Vec::new(),
            })
        };
        use crate::bus::Bus;
        // The relay subscribes to the bus in its own task: publish until
        // it has.
        while watcher.0.lock().unwrap().is_empty() {
            bus.publish(&[report("d2"), report("d1")]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(watcher.0.lock().unwrap().iter().all(|d| d == "d1"));
        hub.unwatch(id, "d1").await.unwrap();
        assert!(!interest.is_watched("d1"));
        assert_eq!(hub.watched_devices(), 0);
    }
}
