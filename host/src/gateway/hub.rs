//! The hub of one instance: which local WebSocket clients watch which
//! devices, and the one way publications reach them.
//!
//! With Redis, the hub holds one subscriber connection and SUBSCRIBEs a
//! device's four channels when its first local watcher comes, UNSUBSCRIBEs
//! after the last; it keeps `ws:sub:{device}` as the contract says (INCR per
//! watching client, DECR when it leaves, EXPIRE 300 s refreshed every
//! 120 s) and announces a device's first and last watcher on
//! `sluice:interest`, so every publisher's interest mirror follows. With
//! the in-process bus, the same hub takes publications from the process
//! and keeps the interest set itself.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use redis::aio::{ConnectionManager, PubSubSink};
use redis::{Client, Script};
use tokio::sync::{broadcast, watch};

use super::frames::Rendered;
use crate::bus::{BusError, INTEREST_CHANNEL, Interest, Publication};

/// How long a watcher count lives without a refresh.
pub const WATCH_TTL_SECS: u64 = 300;
/// How often held watcher counts are refreshed.
pub const WATCH_REFRESH: Duration = Duration::from_secs(120);

/// INCR the watcher count, set its TTL, announce a first watcher.
/// KEYS: ws:sub:{device}. ARGV: ttl, interest channel, event.
const WATCH_LUA: &str = r"
local n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
if n == 1 then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return n
";

/// DECR the watcher count; at zero delete it and announce the last watcher.
/// KEYS: ws:sub:{device}. ARGV: ttl, interest channel, event.
const UNWATCH_LUA: &str = r"
local n = redis.call('DECR', KEYS[1])
if n <= 0 then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
else
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return n
";

/// Refresh the TTL; if the key is gone (expired, or Redis restarted
/// empty), put this instance's count back and announce it.
/// KEYS: ws:sub:{device}. ARGV: ttl, count, interest channel, event.
const REFRESH_LUA: &str = r"
if redis.call('EXPIRE', KEYS[1], ARGV[1]) == 0 then
  redis.call('INCRBY', KEYS[1], ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  redis.call('PUBLISH', ARGV[3], ARGV[4])
end
return 1
";

/// Something that takes publications about the devices it watches.
pub trait Watcher: Send + Sync {
    /// A publication about a watched device, with frame parts shared by
    /// every watcher; must not block.
    fn deliver(&self, publication: &Rendered<'_>);
}

/// A watcher's handle in the hub.
pub type WatcherId = u64;

#[derive(Default)]
struct Table {
    /// Device → its local watchers.
    devices: HashMap<String, HashMap<WatcherId, Arc<dyn Watcher>>>,
}

struct RedisSide {
    connection: ConnectionManager,
    /// The subscriber connection's command half, while connected.
    sink: tokio::sync::Mutex<Option<PubSubSink>>,
    /// Devices whose channels the subscriber connection holds.
    subscribed: Mutex<HashSet<String>>,
    watch: Script,
    unwatch: Script,
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

fn interest_event(device: &str, watched: bool) -> String {
    serde_json::json!({"device": device, "watched": watched}).to_string()
}

fn watch_key(device: &str) -> String {
    format!("ws:sub:{device}")
}

fn unavailable(error: redis::RedisError) -> BusError {
    BusError::Unavailable(error.to_string())
}

impl Hub {
    /// A hub fed by the in-process bus.
    pub fn in_process(
        interest: Arc<Interest>,
        publications: broadcast::Receiver<Arc<Publication>>,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Hub> {
        let hub = Arc::new(Hub {
            table: Mutex::default(),
            next_id: AtomicU64::new(1),
            interest,
            redis: None,
        });
        tokio::spawn(relay_in_process(hub.clone(), publications, shutdown));
        hub
    }

    /// A hub fed by Redis through one subscriber connection.
    pub async fn with_redis(
        client: Client,
        interest: Arc<Interest>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Hub>, BusError> {
        let connection = ConnectionManager::new(client.clone())
            .await
            .map_err(unavailable)?;
        let hub = Arc::new(Hub {
            table: Mutex::default(),
            next_id: AtomicU64::new(1),
            interest,
            redis: Some(RedisSide {
                connection,
                sink: tokio::sync::Mutex::new(None),
                subscribed: Mutex::default(),
                watch: Script::new(WATCH_LUA),
                unwatch: Script::new(UNWATCH_LUA),
            }),
        });
        tokio::spawn(relay_redis(hub.clone(), client, shutdown.clone()));
        tokio::spawn(refresh_watches(hub.clone(), shutdown));
        Ok(hub)
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new watcher id.
    pub fn register(&self) -> WatcherId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Devices some local client watches.
    pub fn watched_devices(&self) -> usize {
        self.table().devices.len()
    }

    /// `watcher` (under `id`) watches `device` from now on. Returns once
    /// publications about it can reach this instance.
    pub async fn watch(
        &self,
        id: WatcherId,
        watcher: Arc<dyn Watcher>,
        device: &str,
    ) -> Result<(), BusError> {
        let first = {
            let mut table = self.table();
            let watchers = table.devices.entry(device.to_owned()).or_default();
            watchers.insert(id, watcher);
            watchers.len() == 1
        };
        self.interest.set(device, true);
        let Some(redis) = &self.redis else {
            return Ok(());
        };
        let counted = redis
            .watch
            .key(watch_key(device))
            .arg(WATCH_TTL_SECS)
            .arg(INTEREST_CHANNEL)
            .arg(interest_event(device, true))
            .invoke_async::<i64>(&mut redis.connection.clone())
            .await;
        if let Err(error) = counted {
            // Not counted in Redis, so not held here either: a later
            // unwatch must not take away another client's count.
            self.forget(id, device);
            return Err(unavailable(error));
        }
        if first {
            self.reconcile(device).await?;
        }
        Ok(())
    }

    /// Removes `id`'s watch of `device` from the local table only.
    fn forget(&self, id: WatcherId, device: &str) {
        let mut table = self.table();
        if let Some(watchers) = table.devices.get_mut(device) {
            watchers.remove(&id);
            if watchers.is_empty() {
                table.devices.remove(device);
            }
        }
    }

    /// `id` no longer watches `device`.
    pub async fn unwatch(&self, id: WatcherId, device: &str) -> Result<(), BusError> {
        let (was_watching, last) = {
            let mut table = self.table();
            let Some(watchers) = table.devices.get_mut(device) else {
                return Ok(());
            };
            let was = watchers.remove(&id).is_some();
            let last = watchers.is_empty();
            if last {
                table.devices.remove(device);
            }
            (was, last)
        };
        if !was_watching {
            return Ok(());
        }
        let Some(redis) = &self.redis else {
            if last {
                self.interest.set(device, false);
            }
            return Ok(());
        };
        redis
            .unwatch
            .key(watch_key(device))
            .arg(WATCH_TTL_SECS)
            .arg(INTEREST_CHANNEL)
            .arg(interest_event(device, false))
            .invoke_async::<i64>(&mut redis.connection.clone())
            .await
            .map_err(unavailable)?;
        if last {
            self.reconcile(device).await?;
        }
        Ok(())
    }

    /// Brings the subscriber connection in line with the table for `device`.
    async fn reconcile(&self, device: &str) -> Result<(), BusError> {
        let Some(redis) = &self.redis else {
            return Ok(());
        };
        // One reconciliation at a time: the sink lock orders them.
        let mut sink = redis.sink.lock().await;
        let Some(sink) = sink.as_mut() else {
            // Not connected: the relay subscribes everything watched when it connects.
            return Ok(());
        };
        let wanted = self.table().devices.contains_key(device);
        let held = redis
            .subscribed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(device);
        if wanted && !held {
            sink.subscribe(&Publication::channels(device))
                .await
                .map_err(unavailable)?;
            lock_set(&redis.subscribed).insert(device.to_owned());
        } else if !wanted && held {
            sink.unsubscribe(&Publication::channels(device))
                .await
                .map_err(unavailable)?;
            lock_set(&redis.subscribed).remove(device);
        }
        Ok(())
    }

    /// Hands `publication` to the local watchers of its device.
    pub fn dispatch(&self, publication: &Publication) {
        let watchers: Vec<Arc<dyn Watcher>> = match self.table().devices.get(publication.device()) {
            Some(watchers) => watchers.values().cloned().collect(),
            None => return,
        };
        let rendered = Rendered::new(publication);
        for watcher in watchers {
            watcher.deliver(&rendered);
        }
    }

    /// Local watcher counts of every watched device.
    fn counts(&self) -> Vec<(String, usize)> {
        self.table()
            .devices
            .iter()
            .map(|(d, w)| (d.clone(), w.len()))
            .collect()
    }

    /// Refreshes (or restores) the watcher counts this instance holds.
    async fn refresh(&self) -> Result<(), BusError> {
        let Some(redis) = &self.redis else {
            return Ok(());
        };
        let counts = self.counts();
        for chunk in counts.chunks(500) {
            let mut pipe = redis::pipe();
            for (device, count) in chunk {
                pipe.cmd("EVAL")
                    .arg(REFRESH_LUA)
                    .arg(1)
                    .arg(watch_key(device))
                    .arg(WATCH_TTL_SECS)
                    .arg(*count)
                    .arg(INTEREST_CHANNEL)
                    .arg(interest_event(device, true))
                    .ignore();
            }
            pipe.query_async::<()>(&mut redis.connection.clone())
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }
}

fn lock_set(set: &Mutex<HashSet<String>>) -> std::sync::MutexGuard<'_, HashSet<String>> {
    set.lock().unwrap_or_else(|e| e.into_inner())
}

async fn relay_in_process(
    hub: Arc<Hub>,
    mut publications: broadcast::Receiver<Arc<Publication>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            received = publications.recv() => match received {
                Ok(publication) => hub.dispatch(&publication),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    metrics::counter!("sluice_ws_frames_dropped_total").increment(missed);
                    tracing::warn!(missed, "the WebSocket hub fell behind the in-process bus");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// Holds the subscriber connection: connects, subscribes every watched
/// device, relays messages; on loss, reconnects with backoff.
async fn relay_redis(hub: Arc<Hub>, client: Client, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match relay_once(&hub, &client, &mut shutdown).await {
            Ok(()) => return,
            Err(error) => {
                metrics::counter!("sluice_bus_errors_total", "op" => "hub").increment(1);
                tracing::warn!(%error, retry_in = ?backoff, "WebSocket hub lost Redis; reconnecting");
            }
        }
        if let Some(redis) = &hub.redis {
            *redis.sink.lock().await = None;
            lock_set(&redis.subscribed).clear();
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn relay_once(
    hub: &Hub,
    client: &Client,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), redis::RedisError> {
    let Some(redis) = &hub.redis else {
        return Ok(());
    };
    let (mut sink, mut stream) = client.get_async_pubsub().await?.split();
    {
        let mut held = redis.sink.lock().await;
        let devices: Vec<String> = hub.table().devices.keys().cloned().collect();
        for device in &devices {
            sink.subscribe(&Publication::channels(device)).await?;
        }
        lock_set(&redis.subscribed).extend(devices);
        *held = Some(sink);
    }
    // Counts may have expired or vanished with a restarted Redis.
    if let Err(error) = hub.refresh().await {
        tracing::warn!(%error, "could not restore watcher counts");
    }
    loop {
        tokio::select! {
            message = stream.next() => {
                let Some(message) = message else {
                    return Err(redis::RedisError::from((redis::ErrorKind::Io, "subscriber connection closed")));
                };
                match Publication::parse(message.get_channel_name(), message.get_payload_bytes()) {
                    Ok(publication) => hub.dispatch(&publication),
                    Err(error) => tracing::warn!(%error, "ignoring a malformed publication"),
                }
            }
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
        let (tx, rx) = broadcast::channel(16);
        let (_stop, stop_rx) = watch::channel(false);
        let hub = Hub::in_process(interest.clone(), rx, stop_rx);
        let watcher = Arc::new(Collect::default());
        let id = hub.register();
        hub.watch(id, watcher.clone(), "d1").await.unwrap();
        assert!(interest.is_watched("d1"));
        let report = |device: &str| {
            Arc::new(Publication::Telemetry(crate::bus::TelemetryReport {
                device_id: device.into(),
                tenant_id: String::new(),
                timestamp: 1,
                data: crate::script::Fields::new(),
            }))
        };
        tx.send(report("d1")).unwrap();
        tx.send(report("d2")).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(*watcher.0.lock().unwrap(), vec!["d1".to_owned()]);
        hub.unwatch(id, "d1").await.unwrap();
        assert!(!interest.is_watched("d1"));
        assert_eq!(hub.watched_devices(), 0);
    }
}
