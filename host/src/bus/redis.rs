//! Redis as the bus of several instances.
//!
//! Keys and channels (a contract; `sluice:` keys are sluice's own):
//!
//! | key / channel | what |
//! |---|---|
//! | `ws:sub:{device}` | watcher count, kept by gateways (INCR/DECR, EXPIRE 300 s) |
//! | `ws:device:{device}` | telemetry channel |
//! | `device:{device}:status` | status channel |
//! | `sluice:alert:{device}`, `sluice:event:{device}` | alert and event channels |
//! | `sluice:interest` | channel: `{"device": …, "watched": true/false}` when a device's first watcher comes or its last goes |
//! | `sluice:status` | hash: device → its last status change (the status channel's JSON) |
//! | `sluice:status:transitions` | capped stream of status changes |
//! | `sluice:latest:{device}` | hash: `t:<key>` and `a:<key>` → JSON value, `systime` → ms |
//! | `sluice:deadlines` | sorted set: `h:{device}` / `t:{device}` scored by deadline (ms) |
//! | `sluice:deadletter` | capped stream of dead letters |

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Client, Script};

use super::{Bus, BusError, Deadline, Interest, Publication, StatusChange};
use crate::config::RedisConfig;
use crate::deadletter::DeadLetter;
use crate::latest::{Delta, Snapshot};
use crate::script::Fields;
use crate::status::{DeviceStatus, StatusSource};

/// The channel on which gateways announce a device's first and last watcher.
pub const INTEREST_CHANNEL: &str = "sluice:interest";

const STATUS_KEY: &str = "sluice:status";
const TRANSITIONS_KEY: &str = "sluice:status:transitions";
const TRANSITIONS_MAXLEN: usize = 100_000;
const DEADLINES_KEY: &str = "sluice:deadlines";
const DEADLETTER_KEY: &str = "sluice:deadletter";

fn latest_key(device: &str) -> String {
    format!("sluice:latest:{device}")
}

/// Applies a batch of status changes: each takes effect only if the table
/// does not already hold that `is_online`; effective changes go to the
/// table and the transitions stream, and are published when watched.
///
/// KEYS: status hash, transitions stream. ARGV: maxlen, count, then per
/// change: device, is_online, json, watched, channel.
const TRANSITIONS_LUA: &str = r"
local out = {}
local p = 3
for k = 1, tonumber(ARGV[2]) do
  local device, online, json, watched, channel = ARGV[p], ARGV[p+1], ARGV[p+2], ARGV[p+3], ARGV[p+4]
  p = p + 5
  local changed = 1
  local current = redis.call('HGET', KEYS[1], device)
  if current then
    local ok, decoded = pcall(cjson.decode, current)
    if ok and tostring(decoded['is_online']) == online then changed = 0 end
  end
  if changed == 1 then
    redis.call('HSET', KEYS[1], device, json)
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'device', device, 'change', json)
    if watched == '1' then redis.call('PUBLISH', channel, json) end
  end
  out[k] = changed
end
return out
";

/// Takes deadlines that have passed, atomically, so exactly one caller
/// gets each. KEYS: deadlines. ARGV: now (ms), limit.
const SWEEP_LUA: &str = r"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #due > 0 then redis.call('ZREM', KEYS[1], unpack(due)) end
return due
";

/// The Redis bus.
pub struct RedisBus {
    client: Client,
    connection: ConnectionManager,
    transitions: Script,
    sweep: Script,
    dead_letter_cap: usize,
    records: Option<(String, usize)>,
}

impl std::fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBus").finish_non_exhaustive()
    }
}

fn unavailable(error: redis::RedisError) -> BusError {
    BusError::Unavailable(error.to_string())
}

impl RedisBus {
    /// Connects (retrying with backoff while Redis is restarting).
    pub async fn connect(
        config: &RedisConfig,
        dead_letter_cap: usize,
        records: Option<(String, usize)>,
    ) -> Result<Self, BusError> {
        let client = Client::open(config.url.as_str()).map_err(unavailable)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let connection = ConnectionManager::new_with_config(client.clone(), manager_config)
            .await
            .map_err(unavailable)?;
        Ok(RedisBus {
            client,
            connection,
            transitions: Script::new(TRANSITIONS_LUA),
            sweep: Script::new(SWEEP_LUA),
            dead_letter_cap,
            records,
        })
    }

    fn connection(&self) -> ConnectionManager {
        // Clones share one multiplexed connection.
        self.connection.clone()
    }

    /// The client, for subscriber connections.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

#[async_trait]
impl Bus for RedisBus {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn shares_deadlines(&self) -> bool {
        true
    }

    async fn ping(&self) -> Result<(), BusError> {
        let pong: String = redis::cmd("PING")
            .query_async(&mut self.connection())
            .await
            .map_err(unavailable)?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(BusError::Corrupt(format!("PING answered {pong:?}")))
        }
    }

    async fn publish(&self, batch: &[Publication]) -> Result<(), BusError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for publication in batch {
            pipe.publish(publication.channel(), publication.payload())
                .ignore();
        }
        pipe.query_async::<()>(&mut self.connection())
            .await
            .map_err(unavailable)
    }

    async fn record_transitions(
        &self,
        batch: &[StatusChange],
        watched: &[bool],
    ) -> Result<Vec<bool>, BusError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.transitions.prepare_invoke();
        invocation
            .key(STATUS_KEY)
            .key(TRANSITIONS_KEY)
            .arg(TRANSITIONS_MAXLEN)
            .arg(batch.len());
        for (change, watched) in batch.iter().zip(watched) {
            let publication = Publication::Status(change.clone());
            invocation
                .arg(&change.device_id)
                .arg(u8::from(change.is_online))
                .arg(publication.payload())
                .arg(u8::from(*watched))
                .arg(publication.channel());
        }
        let applied: Vec<i64> = invocation
            .invoke_async(&mut self.connection())
            .await
            .map_err(unavailable)?;
        Ok(applied.into_iter().map(|a| a == 1).collect())
    }

    async fn load_status(&self) -> Result<Vec<(String, DeviceStatus)>, BusError> {
        let mut connection = self.connection();
        let mut statuses = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, entries): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
                .arg(STATUS_KEY)
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut connection)
                .await
                .map_err(unavailable)?;
            for (device, json) in entries {
                statuses.push((device, parse_status(&json)?));
            }
            if next == 0 {
                return Ok(statuses);
            }
            cursor = next;
        }
    }

    async fn store_latest(&self, batch: &[(String, Delta)]) -> Result<(), BusError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (device, delta) in batch {
            let mut items: Vec<(String, String)> =
                Vec::with_capacity(delta.telemetry.len() + delta.attributes.len() + 1);
            for (key, value) in delta.telemetry.iter() {
                items.push((format!("t:{key}"), value.to_string()));
            }
            for (key, value) in delta.attributes.iter() {
                items.push((format!("a:{key}"), value.to_string()));
            }
            if delta.updated_ms > 0 {
                items.push(("systime".into(), delta.updated_ms.to_string()));
            }
            if !items.is_empty() {
                pipe.hset_multiple(latest_key(device), &items).ignore();
            }
        }
        pipe.query_async::<()>(&mut self.connection())
            .await
            .map_err(unavailable)
    }

    async fn load_device_status(&self, device: &str) -> Result<Option<DeviceStatus>, BusError> {
        let json: Option<String> = self
            .connection()
            .hget(STATUS_KEY, device)
            .await
            .map_err(unavailable)?;
        json.map(|j| parse_status(&j)).transpose()
    }

    async fn load_latest(&self, device: &str) -> Result<Option<Snapshot>, BusError> {
        let entries: Vec<(String, String)> = self
            .connection()
            .hgetall(latest_key(device))
            .await
            .map_err(unavailable)?;
        if entries.is_empty() {
            return Ok(None);
        }
        let mut telemetry = Vec::new();
        let mut attributes = Vec::new();
        let mut updated_ms = 0;
        for (field, json) in entries {
            let value = || {
                serde_json::from_str(&json)
                    .map_err(|e| BusError::Corrupt(format!("{device} {field}: {e}")))
            };
            if let Some(key) = field.strip_prefix("t:") {
                telemetry.push((key.to_owned(), value()?));
            } else if let Some(key) = field.strip_prefix("a:") {
                attributes.push((key.to_owned(), value()?));
            } else if field == "systime" {
                updated_ms = json.parse().unwrap_or(0);
            }
        }
        Ok(Some(Snapshot {
            telemetry: Fields::from_pairs(telemetry),
            attributes: Fields::from_pairs(attributes),
            updated_ms,
        }))
    }

    async fn store_deadlines(&self, batch: &[Deadline]) -> Result<(), BusError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for deadline in batch {
            let heartbeat = format!("h:{}", deadline.device);
            let timeout = format!("t:{}", deadline.device);
            if deadline.at_ms <= 0 {
                pipe.zrem(DEADLINES_KEY, &[&heartbeat, &timeout]).ignore();
                continue;
            }
            let (member, other) = match deadline.source {
                StatusSource::TimeoutExpired => (timeout, heartbeat),
                _ => (heartbeat, timeout),
            };
            // GT: an instance with older news never moves a deadline back.
            pipe.cmd("ZADD")
                .arg(DEADLINES_KEY)
                .arg("GT")
                .arg(deadline.at_ms)
                .arg(member)
                .ignore();
            pipe.zrem(DEADLINES_KEY, other).ignore();
        }
        pipe.query_async::<()>(&mut self.connection())
            .await
            .map_err(unavailable)
    }

    async fn sweep_deadlines(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<(String, StatusSource)>, BusError> {
        let due: Vec<String> = self
            .sweep
            .key(DEADLINES_KEY)
            .arg(now_ms)
            .arg(limit)
            .invoke_async(&mut self.connection())
            .await
            .map_err(unavailable)?;
        Ok(due
            .into_iter()
            .filter_map(|member| match member.split_once(':') {
                Some(("h", device)) => Some((device.to_owned(), StatusSource::HeartbeatExpired)),
                Some(("t", device)) => Some((device.to_owned(), StatusSource::TimeoutExpired)),
                _ => None,
            })
            .collect())
    }

    async fn add_dead_letters(&self, batch: &[DeadLetter]) -> Result<(), BusError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for letter in batch {
            let json = serde_json::to_string(letter).expect("dead letters serialise to JSON");
            pipe.cmd("XADD")
                .arg(DEADLETTER_KEY)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.dead_letter_cap)
                .arg("*")
                .arg("letter")
                .arg(json)
                .ignore();
        }
        pipe.query_async::<()>(&mut self.connection())
            .await
            .map_err(unavailable)
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BusError> {
        let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
            .arg(DEADLETTER_KEY)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut self.connection())
            .await
            .map_err(unavailable)?;
        entries
            .into_iter()
            .filter_map(|(_, fields)| {
                fields
                    .into_iter()
                    .find(|(k, _)| k == "letter")
                    .map(|(_, v)| v)
            })
            .map(|json| {
                serde_json::from_str(&json)
                    .map_err(|e| BusError::Corrupt(format!("dead letter: {e}")))
            })
            .collect()
    }

    async fn add_records(&self, batch: &[String]) -> Result<(), BusError> {
        let Some((key, maxlen)) = &self.records else {
            return Ok(());
        };
        if batch.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for record in batch {
            pipe.cmd("XADD")
                .arg(key)
                .arg("MAXLEN")
                .arg("~")
                .arg(*maxlen)
                .arg("*")
                .arg("record")
                .arg(record)
                .ignore();
        }
        pipe.query_async::<()>(&mut self.connection())
            .await
            .map_err(unavailable)
    }
}

fn parse_status(json: &str) -> Result<DeviceStatus, BusError> {
    #[derive(serde::Deserialize)]
    struct Stored {
        is_online: u8,
        timestamp: i64,
        source: String,
    }
    let stored: Stored = serde_json::from_str(json)
        .map_err(|e| BusError::Corrupt(format!("status {json:?}: {e}")))?;
    Ok(DeviceStatus {
        online: stored.is_online == 1,
        since_ms: stored.timestamp,
        source: StatusSource::parse(&stored.source).unwrap_or(StatusSource::StatusMessage),
    })
}

/// Keeps `interest` equal to the set of devices with a positive
/// `ws:sub:{device}`: a full scan at start and every `resync`, and the
/// `sluice:interest` channel in between. Reconnects with backoff; ends at
/// `shutdown`.
pub async fn mirror_interest(
    client: Client,
    interest: Arc<Interest>,
    resync: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match mirror_once(&client, &interest, resync, &mut shutdown).await {
            Ok(()) => return,
            Err(error) => {
                metrics::counter!("sluice_bus_errors_total", "op" => "interest").increment(1);
                tracing::warn!(%error, retry_in = ?backoff, "interest mirror lost Redis; reconnecting");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[derive(serde::Deserialize)]
struct InterestChange {
    device: String,
    watched: bool,
}

async fn mirror_once(
    client: &Client,
    interest: &Interest,
    resync: Duration,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), redis::RedisError> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(INTEREST_CHANNEL).await?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    // Subscribed before scanning: a change during the scan arrives on the
    // channel and is applied after it.
    interest.replace(scan_watched(&mut connection).await?);
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
                    Ok(change) => interest.set(&change.device, change.watched),
                    Err(error) => tracing::warn!(%error, "ignoring a malformed message on sluice:interest"),
                }
            }
            _ = ticker.tick() => {
                interest.replace(scan_watched(&mut connection).await?);
                metrics::gauge!("sluice_interest_devices").set(interest.len() as f64);
            }
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

/// Devices whose `ws:sub:{device}` count is positive.
async fn scan_watched(
    connection: &mut redis::aio::MultiplexedConnection,
) -> Result<HashSet<String>, redis::RedisError> {
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
    for chunk in keys.chunks(500) {
        let counts: Vec<Option<i64>> = redis::cmd("MGET")
            .arg(chunk)
            .query_async(connection)
            .await?;
        for (key, count) in chunk.iter().zip(counts) {
            if count.unwrap_or(0) > 0
                && let Some(device) = key.strip_prefix("ws:sub:")
            {
                watched.insert(device.to_owned());
            }
        }
    }
    Ok(watched)
}
