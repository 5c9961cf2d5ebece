//! The interest mirror: every publishing instance's copy of which devices
//! and groups are watched anywhere, so an unwatched device costs no Redis
//! call.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::target::{Reconnect, RedisTarget};
use crate::bus::Interest;

/// The channel on which gateways announce a device's first and last watcher.
pub const INTEREST_CHANNEL: &str = "sluice:interest";

/// Where a group's watcher count lives: `ws:sub:group:{group}`. (It shares
/// the key space of device counts: a device whose id starts with `group:`
/// is read as a group by the mirror.)
pub const GROUP_WATCH_PREFIX: &str = "ws:sub:group:";

/// Keeps `interest` equal to the set of devices with a positive
/// `ws:sub:{device}` and of groups with a positive `ws:sub:group:{group}`:
/// a full scan at start and every `resync`, and the `sluice:interest`
/// channel in between. Reconnects with backoff, and at once to a new
/// master; ends at `shutdown`.
pub async fn mirror_interest(
    target: RedisTarget,
    interest: Arc<Interest>,
    resync: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut reconnect = Reconnect::new(&target);
    loop {
        match mirror_once(&mut reconnect, &interest, resync, &mut shutdown).await {
            Ok(()) => return,
            Err(error) => {
                metrics::counter!("sluice_bus_errors_total", "op" => "interest").increment(1);
                tracing::warn!(%error, retry_in = ?reconnect.backoff(), "interest mirror lost Redis; reconnecting");
            }
        }
        if !reconnect.pause(&mut shutdown).await {
            return;
        }
    }
}

/// An event on the interest channel: one device (`device`), many
/// (`devices`) or groups (`groups`) got a first watcher, or lost their
/// last.
#[derive(serde::Deserialize)]
struct InterestChange {
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    devices: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    watched: bool,
}

async fn mirror_once(
    reconnect: &mut Reconnect,
    interest: &Interest,
    resync: Duration,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), redis::RedisError> {
    let client = reconnect.client();
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(INTEREST_CHANNEL).await?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    // Subscribed before scanning: a change during the scan arrives on the
    // channel and is applied after it.
    resync_interest(interest, &mut connection).await?;
    reconnect.connected();
    let mut messages = pubsub.on_message();
    let mut ticker = tokio::time::interval(resync);
    ticker.tick().await;
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else {
                    return Err(redis::RedisError::from((redis::ErrorKind::Io, "interest subscription closed")));
                };
                match serde_json::from_slice::<InterestChange>(message.get_payload_bytes()) {
                    Ok(change) => {
                        let devices = change.device.iter().chain(&change.devices);
                        interest.set_many(devices.map(String::as_str), change.watched);
                        interest.set_groups(change.groups.iter().map(String::as_str), change.watched);
                    }
                    Err(error) => tracing::warn!(%error, "ignoring a malformed message on sluice:interest"),
                }
            }
            _ = ticker.tick() => {
                resync_interest(interest, &mut connection).await?;
                metrics::gauge!("sluice_interest_devices").set(interest.len() as f64);
                metrics::gauge!("sluice_interest_groups").set(interest.group_count() as f64);
            }
            error = reconnect.moved() => return Err(error),
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

/// Replaces the watched devices and groups with what Redis counts.
async fn resync_interest(
    interest: &Interest,
    connection: &mut redis::aio::MultiplexedConnection,
) -> Result<(), redis::RedisError> {
    let (devices, groups) = scan_watched(connection).await?;
    interest.replace(devices);
    interest.replace_groups(groups);
    Ok(())
}

/// Devices whose `ws:sub:{device}` count is positive, and groups whose
/// `ws:sub:group:{group}` count is.
async fn scan_watched(
    connection: &mut redis::aio::MultiplexedConnection,
) -> Result<(HashSet<String>, HashSet<String>), redis::RedisError> {
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("ws:sub:*")
            .arg("COUNT")
            .arg(1000)
            .query_async(connection)
            .await?;
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let mut watched = HashSet::new();
    let mut groups = HashSet::new();
    for chunk in keys.chunks(500) {
        let counts: Vec<Option<i64>> = redis::cmd("MGET")
            .arg(chunk)
            .query_async(connection)
            .await?;
        for (key, count) in chunk.iter().zip(counts) {
            if count.unwrap_or(0) <= 0 {
                continue;
            }
            if let Some(group) = key.strip_prefix(GROUP_WATCH_PREFIX) {
                groups.insert(group.to_owned());
            } else if let Some(device) = key.strip_prefix("ws:sub:") {
                watched.insert(device.to_owned());
            }
        }
    }
    Ok((watched, groups))
}
