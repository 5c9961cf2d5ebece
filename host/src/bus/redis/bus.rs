//! [`RedisBus`]: the bus of several instances on one Redis.

use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use tokio::sync::watch;

use super::scripts::Scripts;
use super::target::RedisTarget;
use crate::bus::history::{HistoryKind, HistoryLimits, Position, RangeQuery, Recorded, Recovery};
use crate::bus::{Bus, BusError, Deadline, Publication, StatusChange};
use crate::config::RedisConfig;
use crate::deadletter::DeadLetter;
use crate::latest::{Delta, Snapshot};
use crate::script::Fields;
use crate::status::{DeviceStatus, StatusSource};

pub(super) const STATUS_KEY: &str = "sluice:status";
pub(super) const TRANSITIONS_KEY: &str = "sluice:status:transitions";
const TRANSITIONS_MAXLEN: usize = 100_000;
const DEADLINES_KEY: &str = "sluice:deadlines";
const DEADLETTER_KEY: &str = "sluice:deadletter";
/// Devices per round trip when many are loaded at once.
const LOAD_CHUNK: usize = 1000;
/// Alerts and events per script call when recorded.
const RECORD_CHUNK: usize = 200;

fn latest_key(device: &str) -> String {
    format!("sluice:latest:{device}")
}

/// The longest one `WAIT` for replicas blocks the connection of confirmed
/// writes before it is sent again.
const MAX_REPLICA_WAIT: Duration = Duration::from_millis(100);

/// The Redis bus.
pub struct RedisBus {
    target: RedisTarget,
    scripts: Scripts,
    /// Replicas that must have a status change, alert or event before it
    /// counts as recorded, and how long to wait for them.
    replicas: Option<(usize, Duration)>,
    history: HistoryLimits,
    dead_letter_cap: usize,
    records: Option<(String, usize)>,
    /// Who this process is to the history's record ids: new each start.
    writer: String,
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
    /// The bus on `target` (a node, or the master of Sentinels).
    pub fn new(
        target: RedisTarget,
        config: &RedisConfig,
        dead_letter_cap: usize,
        records: Option<(String, usize)>,
        history: HistoryLimits,
    ) -> Self {
        RedisBus {
            target,
            scripts: Scripts::new(),
            replicas: (config.wait_replicas > 0).then_some((config.wait_replicas, config.timeout)),
            history,
            dead_letter_cap,
            records,
            writer: hex::encode(rand::random::<[u8; 8]>()),
        }
    }

    fn connection(&self) -> ConnectionManager {
        // Clones share one multiplexed connection (to the current master).
        self.target.connection()
    }

    /// With `wait_replicas`: waits until that many replicas have every
    /// write sent on `connection` so far (`WAIT`), so a failover cannot
    /// lose what this call reports as recorded. While fewer confirm, it
    /// keeps waiting (what waits on it is held, never written twice);
    /// when `connection`'s master stopped being the master first, the
    /// write may be lost with it and the caller writes it again.
    async fn confirm(
        &self,
        connection: &mut ConnectionManager,
        moves: &watch::Receiver<u64>,
    ) -> Result<(), BusError> {
        let Some((wanted, timeout)) = self.replicas else {
            return Ok(());
        };
        // Short, and well within the response timeout: every caller's
        // WAIT queues on the one connection of confirmed writes, and one
        // that runs out is an answer, not a connection given up.
        let wait_ms = u64::try_from((timeout / 10).min(MAX_REPLICA_WAIT).as_millis())
            .unwrap_or(1)
            .max(1);
        let mut short = false;
        loop {
            let confirmed: usize = redis::cmd("WAIT")
                .arg(wanted)
                .arg(wait_ms)
                .query_async(connection)
                .await
                .map_err(unavailable)?;
            if confirmed >= wanted {
                if short {
                    tracing::info!(wanted, "replicas confirmed the held write");
                }
                return Ok(());
            }
            metrics::counter!("sluice_bus_errors_total", "op" => "replicas").increment(1);
            if moves.has_changed().unwrap_or(true) {
                return Err(BusError::Unavailable(format!(
                    "the Redis master moved before {wanted} replicas (wait_replicas) confirmed a write"
                )));
            }
            if !short {
                short = true;
                tracing::warn!(
                    confirmed,
                    wanted,
                    "fewer replicas than wait_replicas confirmed a status change, alert or event; holding it until they do"
                );
            }
        }
    }

    fn history_age_ms(&self) -> u64 {
        u64::try_from(self.history.max_age.as_millis()).unwrap_or(u64::MAX)
    }

    /// Where the bus connects, for subscriber connections.
    pub fn target(&self) -> &RedisTarget {
        &self.target
    }
}

#[async_trait]
impl Bus for RedisBus {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn moves(&self) -> Option<watch::Receiver<u64>> {
        Some(self.target.moves())
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
            if let Some(payload) = publication.payload() {
                pipe.publish(publication.channel(), payload).ignore();
            }
        }
        pipe.query_async::<()>(&mut self.connection())
            .await
            .map_err(unavailable)
    }

    async fn publish_groups(&self, batch: &[(String, Publication)]) -> Result<(), BusError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (group, publication) in batch {
            if let (Some(channel), Some(payload)) = (
                publication.group_channel(group),
                publication.group_payload(group),
            ) {
                pipe.publish(channel, payload).ignore();
            }
        }
        pipe.query_async::<()>(&mut self.connection())
            .await
            .map_err(unavailable)
    }

    async fn record_transitions(
        &self,
        batch: &[StatusChange],
        watched: &[bool],
        groups: &[Vec<String>],
    ) -> Result<Vec<Option<Position>>, BusError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        // Changes whose JSON cannot be written are left out (and counted).
        let entries: Vec<(usize, Publication, String)> = batch
            .iter()
            .enumerate()
            .filter_map(|(i, change)| {
                let publication = Publication::Status(change.clone());
                let payload = publication.payload()?;
                Some((i, publication, payload))
            })
            .collect();
        let mut invocation = self.scripts.transitions.prepare_invoke();
        invocation
            .key(STATUS_KEY)
            .key(TRANSITIONS_KEY)
            .arg(TRANSITIONS_MAXLEN)
            .arg(entries.len())
            .arg(self.history.max_entries)
            .arg(self.history_age_ms());
        for (i, publication, payload) in &entries {
            invocation
                .arg(publication.device())
                .arg(u8::from(batch[*i].is_online))
                .arg(payload)
                .arg(u8::from(watched.get(*i).copied().unwrap_or(false)))
                .arg(publication.channel())
                .arg(publication.tenant());
            with_groups(&mut invocation, publication, groups.get(*i));
        }
        let (mut connection, moves) = self.target.writes();
        let applied: Vec<String> = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(unavailable)?;
        self.confirm(&mut connection, &moves).await?;
        let mut out = vec![None; batch.len()];
        for ((i, _, _), applied) in entries.iter().zip(applied) {
            if !applied.is_empty() {
                out[*i] = Some(parse_position(&applied)?);
            }
        }
        Ok(out)
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
        parse_latest(device, entries)
    }

    async fn load_latest_many(
        &self,
        devices: &[String],
    ) -> Result<Vec<Option<Snapshot>>, BusError> {
        let mut out = Vec::with_capacity(devices.len());
        for chunk in devices.chunks(LOAD_CHUNK) {
            let mut pipe = redis::pipe();
            for device in chunk {
                pipe.hgetall(latest_key(device));
            }
            let entries: Vec<Vec<(String, String)>> = pipe
                .query_async(&mut self.connection())
                .await
                .map_err(unavailable)?;
            for (device, entries) in chunk.iter().zip(entries) {
                out.push(parse_latest(device, entries)?);
            }
        }
        Ok(out)
    }

    async fn load_status_many(
        &self,
        devices: &[String],
    ) -> Result<Vec<Option<DeviceStatus>>, BusError> {
        let mut out = Vec::with_capacity(devices.len());
        for chunk in devices.chunks(LOAD_CHUNK) {
            let found: Vec<Option<String>> = redis::cmd("HMGET")
                .arg(STATUS_KEY)
                .arg(chunk)
                .query_async(&mut self.connection())
                .await
                .map_err(unavailable)?;
            for json in found {
                out.push(json.map(|j| parse_status(&j)).transpose()?);
            }
        }
        Ok(out)
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
        cutoff_ms: i64,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<StatusChange>, BusError> {
        let (mut connection, moves) = self.target.writes();
        let taken: Vec<String> = self
            .scripts
            .sweep
            .key(DEADLINES_KEY)
            .key(STATUS_KEY)
            .key(TRANSITIONS_KEY)
            .arg(cutoff_ms)
            .arg(limit)
            .arg(now_ms)
            .arg(TRANSITIONS_MAXLEN)
            .arg(self.history.max_entries)
            .arg(self.history_age_ms())
            .invoke_async(&mut connection)
            .await
            .map_err(unavailable)?;
        self.confirm(&mut connection, &moves).await?;
        Ok(taken
            .chunks_exact(4)
            .filter_map(|entry| match serde_json::from_str::<StatusChange>(&entry[2]) {
                Ok(change) => Some(StatusChange {
                    position: parse_position(&entry[3]).ok(),
                    ..change
                }),
                Err(error) => {
                    tracing::warn!(%error, device = %entry[0], "the sweep recorded a change that does not parse");
                    None
                }
            })
            .collect())
    }

    async fn add_dead_letters(&self, batch: &[DeadLetter]) -> Result<(), BusError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for letter in batch {
            let Some(json) = crate::bus::json_text(letter, "dead_letter") else {
                continue;
            };
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

    async fn dead_letters(
        &self,
        limit: usize,
        tenant: Option<&str>,
    ) -> Result<Vec<DeadLetter>, BusError> {
        // Newest first, a page at a time, until `limit` letters match or the
        // (capped) stream ends.
        let mut connection = self.connection();
        let mut found = Vec::new();
        let mut from = "+".to_owned();
        loop {
            let page: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
                .arg(DEADLETTER_KEY)
                .arg(&from)
                .arg("-")
                .arg("COUNT")
                .arg(LOAD_CHUNK)
                .query_async(&mut connection)
                .await
                .map_err(unavailable)?;
            let Some((last, _)) = page.last() else {
                return Ok(found);
            };
            from = format!("({last}");
            let full = page.len() == LOAD_CHUNK;
            for (_, fields) in page {
                let Some((_, json)) = fields.into_iter().find(|(k, _)| k == "letter") else {
                    continue;
                };
                let letter: DeadLetter = serde_json::from_str(&json)
                    .map_err(|e| BusError::Corrupt(format!("dead letter: {e}")))?;
                if tenant.is_none_or(|t| letter.tenant_id == t) {
                    found.push(letter);
                    if found.len() == limit {
                        return Ok(found);
                    }
                }
            }
            if !full {
                return Ok(found);
            }
        }
    }

    async fn record(
        &self,
        batch: &[Publication],
        watched: &[bool],
        groups: &[Vec<String>],
        ids: &[u64],
    ) -> Result<Vec<Option<Position>>, BusError> {
        // Publications whose JSON cannot be written are left out (and counted).
        let entries: Vec<(usize, &Publication, HistoryKind, String, bool, u64)> = batch
            .iter()
            .zip(watched)
            .zip(ids)
            .enumerate()
            .filter_map(|(i, ((publication, watched), id))| {
                let kind = HistoryKind::of(publication)?;
                Some((i, publication, kind, publication.payload()?, *watched, *id))
            })
            .collect();
        let mut out = vec![None; batch.len()];
        if entries.is_empty() {
            return Ok(out);
        }
        let (mut connection, moves) = self.target.writes();
        // One chunk after the other, stopping at the first that fails: a
        // later chunk's ids taken before an earlier one's would make the
        // retry skip the earlier one.
        for chunk in entries.chunks(RECORD_CHUNK) {
            let mut invocation = self.scripts.record.prepare_invoke();
            invocation
                .arg(self.history.max_entries)
                .arg(self.history_age_ms())
                .arg(chunk.len())
                .arg(&self.writer);
            for (i, publication, kind, payload, watched, id) in chunk {
                invocation
                    .arg(publication.tenant())
                    .arg(kind.tag())
                    .arg(publication.device())
                    .arg(payload)
                    .arg(u8::from(*watched))
                    .arg(publication.channel())
                    .arg(*id);
                with_groups(&mut invocation, publication, groups.get(*i));
            }
            let positions: Vec<String> = invocation
                .invoke_async(&mut connection)
                .await
                .map_err(unavailable)?;
            for ((i, ..), position) in chunk.iter().zip(&positions) {
                if !position.is_empty() {
                    out[*i] = Some(parse_position(position)?);
                }
            }
        }
        self.confirm(&mut connection, &moves).await?;
        Ok(out)
    }

    async fn record_history(&self, publication: &Publication) -> Result<Position, BusError> {
        let kind = HistoryKind::of(publication)
            .ok_or_else(|| BusError::Corrupt("telemetry has no history".into()))?;
        let payload = publication
            .payload()
            .ok_or_else(|| BusError::Corrupt("a history entry that cannot be written".into()))?;
        let (mut connection, moves) = self.target.writes();
        let position: String = self
            .scripts
            .append
            .arg(publication.tenant())
            .arg(kind.tag())
            .arg(publication.device())
            .arg(payload)
            .arg(self.history.max_entries)
            .arg(self.history_age_ms())
            .invoke_async(&mut connection)
            .await
            .map_err(unavailable)?;
        self.confirm(&mut connection, &moves).await?;
        parse_position(&position)
    }

    async fn history_tops(&self, tenants: &[String]) -> Result<Vec<Position>, BusError> {
        if tenants.is_empty() {
            return Ok(Vec::new());
        }
        // One round trip for every tenant.
        let mut pipe = redis::pipe();
        pipe.load_script(&self.scripts.top).ignore();
        for tenant in tenants {
            pipe.invoke_script(&self.scripts.top.arg(tenant));
        }
        let tops: Vec<(String, String)> = pipe
            .query_async(&mut self.connection())
            .await
            .map_err(unavailable)?;
        tenants
            .iter()
            .zip(tops)
            .map(|(tenant, (epoch, offset))| {
                Ok(Position {
                    tenant: tenant.clone(),
                    offset: parse_offset(&offset)?,
                    epoch,
                })
            })
            .collect()
    }

    async fn history_after(&self, since: &Position, limit: usize) -> Result<Recovery, BusError> {
        let reply: Vec<String> = self
            .scripts
            .after
            .arg(&since.tenant)
            .arg(since.offset)
            .arg(&since.epoch)
            .arg(limit)
            .invoke_async(&mut self.connection())
            .await
            .map_err(unavailable)?;
        let [epoch, top, recovered, rest @ ..] = reply.as_slice() else {
            return Err(BusError::Corrupt(format!(
                "history read answered {} values",
                reply.len()
            )));
        };
        let mut entries = Vec::with_capacity(rest.len() / 4);
        for entry in rest.chunks_exact(4) {
            entries.push(parse_entry(
                &since.tenant,
                epoch,
                &entry[0],
                &entry[1],
                &entry[3],
            )?);
        }
        Ok(Recovery {
            recovered: recovered == "1",
            entries,
            top: Position {
                tenant: since.tenant.clone(),
                offset: parse_offset(top)?,
                epoch: epoch.clone(),
            },
        })
    }

    async fn history_range(&self, query: &RangeQuery) -> Result<Vec<Recorded>, BusError> {
        let stream = history_key(&query.tenant);
        let mut connection = self.connection();
        let epoch: Option<String> = connection
            .hget(format!("{stream}:meta"), "epoch")
            .await
            .map_err(unavailable)?;
        let Some(epoch) = epoch else {
            return Ok(Vec::new());
        };
        let oldest = format!("{}-0", query.since_ms.max(0));
        let newest = query.until_ms.max(0).to_string();
        // From where the page before stopped (exclusive), else from the
        // range's first end; to its other end. XREVRANGE takes them the
        // other way round.
        let (command, mut start, end) = match (query.newest_first, query.after) {
            (false, Some((ms, offset))) if ms >= query.since_ms => {
                ("XRANGE", format!("({ms}-{offset}"), newest)
            }
            (false, _) => ("XRANGE", oldest, newest),
            (true, Some((ms, offset))) if ms <= query.until_ms => {
                ("XREVRANGE", format!("({ms}-{offset}"), oldest)
            }
            (true, _) => ("XREVRANGE", newest, oldest),
        };
        let mut out = Vec::new();
        while out.len() < query.limit {
            type Entries = Vec<(String, Vec<(String, String)>)>;
            let page: Entries = redis::cmd(command)
                .arg(&stream)
                .arg(&start)
                .arg(&end)
                .arg("COUNT")
                .arg(LOAD_CHUNK)
                .query_async(&mut connection)
                .await
                .map_err(unavailable)?;
            let Some((last, _)) = page.last() else {
                break;
            };
            start = format!("({last}");
            let full = page.len() == LOAD_CHUNK;
            for (id, fields) in &page {
                let field = |name: &str| {
                    fields
                        .iter()
                        .find(|(k, _)| k == name)
                        .map_or("", |(_, v)| v.as_str())
                };
                let wanted = HistoryKind::from_tag(field("k")) == Some(query.kind)
                    && query.device.as_deref().is_none_or(|d| d == field("d"));
                if wanted && out.len() < query.limit {
                    out.push(parse_entry(
                        &query.tenant,
                        &epoch,
                        id,
                        field("k"),
                        field("j"),
                    )?);
                }
            }
            if !full {
                break;
            }
        }
        Ok(out)
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

/// The history stream of `tenant`.
fn history_key(tenant: &str) -> String {
    format!("sluice:history:{{{tenant}}}")
}

/// The arguments of the record scripts that name where `publication`
/// goes as a member of `groups`: its group channel prefix, how many
/// groups, and the groups.
fn with_groups(
    invocation: &mut redis::ScriptInvocation<'_>,
    publication: &Publication,
    groups: Option<&Vec<String>>,
) {
    let prefix = publication.group_channel("").unwrap_or_default();
    let groups = groups.map_or(&[][..], Vec::as_slice);
    invocation.arg(prefix).arg(groups.len());
    for group in groups {
        invocation.arg(group);
    }
}

/// A position's JSON, as the history scripts return it.
fn parse_position(json: &str) -> Result<Position, BusError> {
    serde_json::from_str(json)
        .map_err(|e| BusError::Corrupt(format!("history position {json:?}: {e}")))
}

fn parse_offset(text: &str) -> Result<u64, BusError> {
    text.parse()
        .map_err(|e| BusError::Corrupt(format!("history offset {text:?}: {e}")))
}

/// A history entry (`<ms>-<offset>`, its kind tag and JSON) as what it records.
fn parse_entry(
    tenant: &str,
    epoch: &str,
    id: &str,
    kind: &str,
    json: &str,
) -> Result<Recorded, BusError> {
    let corrupt = |what: String| BusError::Corrupt(format!("history entry {id}: {what}"));
    let (ms, offset) = id
        .split_once('-')
        .ok_or_else(|| corrupt("not <ms>-<offset>".into()))?;
    let recorded_ms: i64 = ms.parse().map_err(|e| corrupt(format!("{e}")))?;
    let position = Position {
        tenant: tenant.to_owned(),
        offset: parse_offset(offset)?,
        epoch: epoch.to_owned(),
    };
    let bad = |e: serde_json::Error| corrupt(e.to_string());
    let publication = match HistoryKind::from_tag(kind) {
        Some(HistoryKind::Alert) => Publication::Alert(serde_json::from_str(json).map_err(bad)?),
        Some(HistoryKind::Event) => Publication::Event(serde_json::from_str(json).map_err(bad)?),
        Some(HistoryKind::Status) => Publication::Status(serde_json::from_str(json).map_err(bad)?),
        Some(HistoryKind::Command) => {
            Publication::Command(Box::new(serde_json::from_str(json).map_err(bad)?))
        }
        None => return Err(corrupt(format!("unknown kind {kind:?}"))),
    };
    Ok(Recorded {
        publication: publication.at(position.clone()),
        position,
        recorded_ms,
    })
}

/// A latest-values hash as a snapshot; `None` when there is none.
fn parse_latest(
    device: &str,
    entries: Vec<(String, String)>,
) -> Result<Option<Snapshot>, BusError> {
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

pub(super) fn parse_status(json: &str) -> Result<DeviceStatus, BusError> {
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
