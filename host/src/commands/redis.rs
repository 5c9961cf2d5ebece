//! Commands in Redis, shared by every instance on it.
//!
//! | key / channel | what |
//! |---|---|
//! | `sluice:command:{id}` | hash: `record` (the command's JSON), `state`, `device` |
//! | `sluice:commands:due` | sorted set: command ids by deadline (reply timeout, queue expiry; ms) |
//! | `sluice:commands:queue:{device}` | list: ids of the device's queued commands, oldest first |
//! | `sluice:commands:queued` | set: devices with queued commands |
//! | `sluice:commands` | channel: a command's JSON at each state change |
//!
//! State changes are compare-and-set on `state` (a Lua script), so of
//! several instances completing, timing out or sending one command exactly
//! one wins. Finished commands are kept for `commands.retain`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use tokio::sync::{broadcast, watch};

use super::model::{Change, CommandError, CommandRecord, CommandState};
use super::store::{CommandStore, EVENTS, applies, changed, deadline_of};
use crate::bus::{Reconnect, RedisTarget};

/// The channel of state changes.
pub const CHANNEL: &str = "sluice:commands";
const DUE: &str = "sluice:commands:due";
const QUEUED: &str = "sluice:commands:queued";
/// Deadlines answered per look.
const DUE_BATCH: usize = 256;

fn record_key(id: &str) -> String {
    format!("sluice:command:{id}")
}

fn queue_key(device: &str) -> String {
    format!("sluice:commands:queue:{device}")
}

/// KEYS: record, due, queue, queued. ARGV: record JSON, state, device, id,
/// deadline ('' for none), queue limit, TTL s.
const INSERT: &str = r"
if ARGV[2] == 'queued' then
  if redis.call('LLEN', KEYS[3]) >= tonumber(ARGV[6]) then return 0 end
  redis.call('RPUSH', KEYS[3], ARGV[4])
  redis.call('SADD', KEYS[4], ARGV[3])
end
redis.call('HSET', KEYS[1], 'record', ARGV[1], 'state', ARGV[2], 'device', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[7])
if ARGV[5] ~= '' then redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4]) end
return 1
";

/// KEYS: record, due, queue, queued. ARGV: expected state, record JSON,
/// new state, id, deadline ('' for none), TTL s, device.
const CHANGE: &str = r"
if redis.call('HGET', KEYS[1], 'state') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'record', ARGV[2], 'state', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[6])
if ARGV[5] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
else
  redis.call('ZREM', KEYS[2], ARGV[4])
end
if ARGV[1] == 'queued' and ARGV[3] ~= 'queued' then
  redis.call('LREM', KEYS[3], 0, ARGV[4])
  if redis.call('LLEN', KEYS[3]) == 0 then redis.call('SREM', KEYS[4], ARGV[7]) end
end
return 1
";

/// KEYS: queue, queued. ARGV: device.
const TAKE: &str = r"
local ids = redis.call('LRANGE', KEYS[1], 0, -1)
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return ids
";

/// KEYS: due. ARGV: now, limit.
const TAKE_DUE: &str = r"
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
if #ids > 0 then redis.call('ZREM', KEYS[1], unpack(ids)) end
return ids
";

/// The Redis store of commands.
pub struct RedisCommands {
    target: RedisTarget,
    events: broadcast::Sender<Arc<CommandRecord>>,
    insert: Script,
    change: Script,
    take: Script,
    due: Script,
    retain: Duration,
}

impl std::fmt::Debug for RedisCommands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCommands").finish_non_exhaustive()
    }
}

fn unavailable(error: redis::RedisError) -> CommandError {
    CommandError::Unavailable(error.to_string())
}

impl RedisCommands {
    /// The store on `target`; `retain` is how long finished commands stay
    /// readable.
    pub fn new(target: RedisTarget, retain: Duration) -> Self {
        RedisCommands {
            target,
            events: broadcast::channel(EVENTS).0,
            insert: Script::new(INSERT),
            change: Script::new(CHANGE),
            take: Script::new(TAKE),
            due: Script::new(TAKE_DUE),
            retain,
        }
    }

    fn connection(&self) -> ConnectionManager {
        self.target.connection()
    }

    /// Seconds a record's key lives: until its deadline, then `retain`.
    fn ttl(&self, record: &CommandRecord) -> u64 {
        let pending = deadline_of(record).map_or(0, |at| {
            u64::try_from((at - record.updated_at).max(0) / 1000).unwrap_or(0)
        });
        pending + self.retain.as_secs().max(1)
    }

    /// Feeds the state changes on [`CHANNEL`] to this store's listeners
    /// until `shutdown`, subscribing again after a lost connection.
    pub async fn follow(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut reconnect = Reconnect::new(&self.target);
        loop {
            let client = reconnect.client();
            let mut subscribed = false;
            let followed = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(CHANNEL).await?;
                subscribed = true;
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    match serde_json::from_slice::<CommandRecord>(message.get_payload_bytes()) {
                        Ok(record) => {
                            let _ = self.events.send(Arc::new(record));
                        }
                        Err(error) => {
                            tracing::warn!(%error, "ignoring a malformed message on sluice:commands");
                        }
                    }
                }
                Ok::<(), redis::RedisError>(())
            };
            tokio::select! {
                result = followed => {
                    if let Err(error) = result {
                        tracing::warn!(%error, "command channel lost; subscribing again");
                    }
                }
                error = reconnect.moved() => {
                    tracing::info!(%error, "subscribing to the command channel on the new master");
                }
                _ = shutdown.changed() => return,
            }
            if subscribed {
                reconnect.connected();
            }
            if !reconnect.pause(&mut shutdown).await {
                return;
            }
        }
    }
}

fn json(record: &CommandRecord) -> String {
    serde_json::to_string(record).expect("a command record is plain JSON")
}

#[async_trait]
impl CommandStore for RedisCommands {
    async fn insert(&self, record: &CommandRecord, queue_limit: usize) -> Result<(), CommandError> {
        let inserted: i64 = self
            .insert
            .key(record_key(&record.id))
            .key(DUE)
            .key(queue_key(&record.device_id))
            .key(QUEUED)
            .arg(json(record))
            .arg(record.state.as_str())
            .arg(&record.device_id)
            .arg(&record.id)
            .arg(
                deadline_of(record)
                    .map(|at| at.to_string())
                    .unwrap_or_default(),
            )
            .arg(queue_limit)
            .arg(self.ttl(record))
            .invoke_async(&mut self.connection())
            .await
            .map_err(unavailable)?;
        if inserted == 0 {
            return Err(CommandError::QueueFull {
                device: record.device_id.clone(),
                limit: queue_limit,
            });
        }
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<CommandRecord>, CommandError> {
        let text: Option<String> = self
            .connection()
            .hget(record_key(id), "record")
            .await
            .map_err(unavailable)?;
        text.map(|text| {
            serde_json::from_str(&text).map_err(|e| {
                CommandError::Unavailable(format!("command {id:?} does not parse: {e}"))
            })
        })
        .transpose()
    }

    async fn transition(
        &self,
        id: &str,
        from: &[CommandState],
        device: Option<&str>,
        change: &Change,
    ) -> Result<Option<CommandRecord>, CommandError> {
        // Read, change, and write only if nobody changed it in between;
        // after a lost race, read again.
        loop {
            let Some(record) = self.get(id).await? else {
                return Ok(None);
            };
            if !applies(&record, from, device) {
                return Ok(None);
            }
            let next = changed(&record, change);
            let written: i64 = self
                .change
                .key(record_key(id))
                .key(DUE)
                .key(queue_key(&record.device_id))
                .key(QUEUED)
                .arg(record.state.as_str())
                .arg(json(&next))
                .arg(next.state.as_str())
                .arg(id)
                .arg(
                    deadline_of(&next)
                        .map(|at| at.to_string())
                        .unwrap_or_default(),
                )
                .arg(self.ttl(&next))
                .arg(&record.device_id)
                .invoke_async(&mut self.connection())
                .await
                .map_err(unavailable)?;
            if written == 1 {
                return Ok(Some(next));
            }
        }
    }

    async fn take_queue(&self, device: &str) -> Result<Vec<String>, CommandError> {
        self.take
            .key(queue_key(device))
            .key(QUEUED)
            .arg(device)
            .invoke_async(&mut self.connection())
            .await
            .map_err(unavailable)
    }

    async fn due(&self, now: i64) -> Result<Vec<String>, CommandError> {
        self.due
            .key(DUE)
            .arg(now)
            .arg(DUE_BATCH)
            .invoke_async(&mut self.connection())
            .await
            .map_err(unavailable)
    }

    async fn queued_devices(&self) -> Result<Vec<String>, CommandError> {
        self.connection()
            .smembers(QUEUED)
            .await
            .map_err(unavailable)
    }

    async fn announce(&self, record: &CommandRecord) -> Result<(), CommandError> {
        let _: i64 = self
            .connection()
            .publish(CHANNEL, json(record))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    fn events(&self) -> broadcast::Receiver<Arc<CommandRecord>> {
        self.events.subscribe()
    }
}
