//! The Lua scripts that make status changes and history atomic in Redis:
//! each transition happens once across all instances, a due deadline is
//! taken and its offline transition recorded in one step, so a crash
//! between the two loses nothing, and whatever is published about an
//! alert, event or transition carries the position it was recorded at in
//! its tenant's history.

/// The history of each tenant: a stream `sluice:history:{tenant}` whose
/// entry ids are `<ms>-<offset>` (the time recorded, which never goes back,
/// and the tenant's entry count), with fields `k` (`a`lert, `e`vent,
/// `s`tatus), `d` (device) and `j` (the JSON, without its position), and a
/// hash `sluice:history:{tenant}:meta` holding `epoch`, `offset` and `ms`
/// (and `w:<writer>`, see [`RECORD`]).
/// A tenant whose meta hash is gone (new, or Redis lost it) starts a new
/// epoch with an empty stream.
///
/// `history_record(tenant, kind, device, json, maxlen, age_ms)` appends and
/// returns the position's JSON; `history_with(json, position)` is the JSON
/// carrying it.
const HISTORY: &str = r#"
if redis.replicate_commands then redis.replicate_commands() end
local function history_keys(tenant)
  local stream = 'sluice:history:{' .. tenant .. '}'
  return stream, stream .. ':meta'
end
local function history_meta(tenant)
  local stream, meta = history_keys(tenant)
  local m = redis.call('HMGET', meta, 'epoch', 'offset', 'ms')
  local epoch, offset, last = m[1], tonumber(m[2] or '0'), tonumber(m[3] or '0')
  if not epoch then
    local now = redis.call('TIME')
    epoch = now[1] .. string.format('%06d', tonumber(now[2]))
    redis.call('DEL', stream)
    redis.call('HSET', meta, 'epoch', epoch, 'offset', 0, 'ms', 0)
    offset, last = 0, 0
  end
  return stream, meta, epoch, offset, last
end
local function history_position(tenant, offset, epoch)
  return '{"tenant":' .. cjson.encode(tenant) .. ',"offset":' .. string.format('%d', offset)
    .. ',"epoch":' .. cjson.encode(epoch) .. '}'
end
local function history_record(tenant, kind, device, json, maxlen, age_ms)
  local stream, meta, epoch, offset, last = history_meta(tenant)
  local now = redis.call('TIME')
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  if ms < last then ms = last end
  offset = offset + 1
  redis.call('HSET', meta, 'offset', offset, 'ms', ms)
  -- Trimmed exactly (not `~`): what is kept is what the operator set,
  -- and each append removes at most a few entries.
  redis.call('XADD', stream, 'MAXLEN', maxlen, string.format('%d-%d', ms, offset),
    'k', kind, 'd', device, 'j', json)
  redis.call('XTRIM', stream, 'MINID', string.format('%d', ms - tonumber(age_ms)))
  return history_position(tenant, offset, epoch)
end
local function history_with(json, position)
  return string.sub(json, 1, -2) .. ',"position":' .. position .. '}'
end
-- `payload` (a JSON object) to the channel `prefix .. group`, with
-- `group`, for each of the `count` groups in ARGV from `first` that is
-- watched (`ws:sub:group:{group}`).
local function publish_groups(prefix, payload, first, count)
  for i = first, first + count - 1 do
    local group = ARGV[i]
    if redis.call('EXISTS', 'ws:sub:group:' .. group) == 1 then
      redis.call('PUBLISH', prefix .. group,
        string.sub(payload, 1, -2) .. ',"group":' .. cjson.encode(group) .. '}')
    end
  end
end
"#;

/// Applies a batch of status changes: each takes effect only if the table
/// does not already hold that `is_online`; effective changes go to the
/// table, the transitions stream and the tenant's history, and are
/// published (with their position) on the device's status channel when it
/// is watched (by the caller's interest mirror, or by a `ws:sub:{device}`
/// count). Returns, per change, its position's JSON, or an empty string
/// when it did not take effect.
///
/// KEYS: status hash, transitions stream. ARGV: maxlen, count, history
/// maxlen, history age (ms), then per change: device, is_online, json,
/// watched, channel, tenant, the group channel prefix, the number of the
/// device's groups, and the groups.
const TRANSITIONS: &str = r"
local out = {}
local p = 5
for k = 1, tonumber(ARGV[2]) do
  local device, online, json, watched, channel, tenant, prefix = ARGV[p], ARGV[p+1], ARGV[p+2], ARGV[p+3], ARGV[p+4], ARGV[p+5], ARGV[p+6]
  local groups = tonumber(ARGV[p+7])
  local first = p + 8
  p = first + groups
  local changed = true
  local current = redis.call('HGET', KEYS[1], device)
  if current then
    local ok, decoded = pcall(cjson.decode, current)
    if ok and tostring(decoded['is_online']) == online then changed = false end
  end
  out[k] = ''
  if changed then
    redis.call('HSET', KEYS[1], device, json)
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'device', device, 'change', json)
    local position = history_record(tenant, 's', device, json, ARGV[3], ARGV[4])
    local published = history_with(json, position)
    if watched == '1' or redis.call('EXISTS', 'ws:sub:' .. device) == 1 then
      redis.call('PUBLISH', channel, published)
    end
    publish_groups(prefix, published, first, groups)
    out[k] = position
  end
end
return out
";

/// Takes deadlines due by the cutoff and, in the same step, takes each
/// device that is online offline: the status table, the transitions
/// stream (with the deadline that passed), the tenant's history (the
/// tenant the table holds for the device), and the status channel when
/// watched. A device that is already offline only loses its deadline.
/// Returns, per transition: device, source, the change's JSON, its
/// position's JSON.
///
/// KEYS: deadlines, status hash, transitions stream. ARGV: cutoff (ms),
/// limit, now (ms), stream maxlen, history maxlen, history age (ms).
const SWEEP: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for i = 1, #due, 2 do
  local member, deadline = due[i], due[i + 1]
  redis.call('ZREM', KEYS[1], member)
  local kind, device = string.sub(member, 1, 1), string.sub(member, 3)
  local source = 'heartbeat_expired'
  if kind == 't' then source = 'timeout_expired' end
  local name = device
  local tenant = ''
  local online = true
  local current = redis.call('HGET', KEYS[2], device)
  if current then
    local ok, decoded = pcall(cjson.decode, current)
    if ok then
      if tostring(decoded['is_online']) == '0' then online = false end
      if type(decoded['device_name']) == 'string' then name = decoded['device_name'] end
      if type(decoded['tenant_id']) == 'string' then tenant = decoded['tenant_id'] end
    end
  end
  if online then
    local json = '{"device_id":' .. cjson.encode(device) .. ',"device_name":' .. cjson.encode(name)
      .. ',"is_online":0,"timestamp":' .. ARGV[3] .. ',"source":"' .. source .. '"'
    if tenant ~= '' then json = json .. ',"tenant_id":' .. cjson.encode(tenant) end
    json = json .. '}'
    redis.call('HSET', KEYS[2], device, json)
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'device', device, 'change', json, 'deadline', deadline)
    local position = history_record(tenant, 's', device, json, ARGV[5], ARGV[6])
    if redis.call('EXISTS', 'ws:sub:' .. device) == 1 then
      redis.call('PUBLISH', 'device:' .. device .. ':status', history_with(json, position))
    end
    table.insert(out, device)
    table.insert(out, source)
    table.insert(out, json)
    table.insert(out, position)
  end
end
return out
"#;

/// Records alerts and events in their tenants' history and publishes each
/// (with its position) when its device is watched. Each has an id of its
/// writer's, increasing; the newest a tenant took from a writer is kept in
/// the tenant's meta hash (`w:<writer>`, with `t:<writer>` the time of its
/// last write, ms), and an entry whose id is not above it was recorded
/// before (its answer was lost) and is skipped. A writer not heard from
/// for the history's age is forgotten when a new one first writes.
/// Returns the positions' JSON, in order (empty for one skipped).
///
/// ARGV: history maxlen, history age (ms), count, writer, then per
/// publication: tenant, kind (`a` or `e`), device, json, watched, channel,
/// id, the group channel prefix, the number of the device's groups, and
/// the groups.
const RECORD: &str = r"
local out = {}
local field = 'w:' .. ARGV[4]
local p = 5
for k = 1, tonumber(ARGV[3]) do
  local tenant, kind, device, json, watched, channel, id, prefix = ARGV[p], ARGV[p+1], ARGV[p+2], ARGV[p+3], ARGV[p+4], ARGV[p+5], tonumber(ARGV[p+6]), ARGV[p+7]
  local groups = tonumber(ARGV[p+8])
  local first = p + 9
  p = first + groups
  local stream, meta = history_meta(tenant)
  out[k] = ''
  local last = redis.call('HGET', meta, field)
  if not last then
    -- A writer new to this tenant: writers it has not heard from for the
    -- history's age are forgotten (what they wrote is trimmed by now).
    local now = redis.call('TIME')
    local cutoff = tonumber(now[1]) * 1000 - tonumber(ARGV[2])
    local all = redis.call('HGETALL', meta)
    for i = 1, #all, 2 do
      local name = all[i]
      if string.sub(name, 1, 2) == 't:' and tonumber(all[i + 1]) < cutoff then
        redis.call('HDEL', meta, name, 'w:' .. string.sub(name, 3))
      end
    end
  end
  if id > tonumber(last or '0') then
    local position = history_record(tenant, kind, device, json, ARGV[1], ARGV[2])
    local now = redis.call('TIME')
    redis.call('HSET', meta, field, id, 't:' .. ARGV[4], tonumber(now[1]) * 1000)
    local published = history_with(json, position)
    if watched == '1' or redis.call('EXISTS', 'ws:sub:' .. device) == 1 then
      redis.call('PUBLISH', channel, published)
    end
    publish_groups(prefix, published, first, groups)
    out[k] = position
  end
end
return out
";

/// Appends one entry to a tenant's history and returns its position.
///
/// ARGV: tenant, kind, device, json, history maxlen, history age (ms).
const APPEND: &str = r"
return history_record(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
";

/// The newest position of a tenant's history (starting its epoch if it
/// has none yet, so a client that saw nothing can still resume).
///
/// ARGV: tenant. Returns: epoch, offset.
const TOP: &str = r"
local stream, meta, epoch, offset = history_meta(ARGV[1])
return {epoch, string.format('%d', offset)}
";

/// What came after a position: the epoch and newest offset (starting the
/// epoch if the tenant has none, so the client gets one to go on from),
/// whether every entry after the position is still kept (and at most the
/// limit), and then those entries, oldest first, flat: id, kind, device,
/// json.
///
/// ARGV: tenant, the position's offset, its epoch, limit.
const AFTER: &str = r"
local stream, meta, epoch, top = history_meta(ARGV[1])
local since = tonumber(ARGV[2])
local missed = top - since
local out = {epoch, string.format('%d', top), '0'}
if epoch ~= ARGV[3] or missed < 0 or missed > tonumber(ARGV[4]) then return out end
if missed == 0 then out[3] = '1' return out end
local entries = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', missed)
if #entries ~= missed then return out end
local oldest = entries[#entries][1]
if tonumber(string.sub(oldest, string.find(oldest, '-') + 1)) ~= since + 1 then return out end
out[3] = '1'
for i = #entries, 1, -1 do
  local id, f = entries[i][1], entries[i][2]
  local fields = {}
  for j = 1, #f, 2 do fields[f[j]] = f[j + 1] end
  table.insert(out, id)
  table.insert(out, fields['k'] or '')
  table.insert(out, fields['d'] or '')
  table.insert(out, fields['j'] or '')
end
return out
";

/// A script with the history functions before `body`.
fn with_history(body: &str) -> redis::Script {
    redis::Script::new(&format!("{HISTORY}{body}"))
}

/// The scripts of the Redis bus.
pub(super) struct Scripts {
    pub(super) transitions: redis::Script,
    pub(super) sweep: redis::Script,
    pub(super) record: redis::Script,
    pub(super) append: redis::Script,
    pub(super) top: redis::Script,
    pub(super) after: redis::Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Scripts {
            transitions: with_history(TRANSITIONS),
            sweep: with_history(SWEEP),
            record: with_history(RECORD),
            append: with_history(APPEND),
            top: with_history(TOP),
            after: with_history(AFTER),
        }
    }
}
