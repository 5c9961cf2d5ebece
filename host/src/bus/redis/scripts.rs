//! The Lua scripts that make status changes atomic in Redis: each
//! transition happens once across all instances, and a due deadline is
//! taken and its offline transition recorded in one step, so a crash
//! between the two loses nothing.

/// Applies a batch of status changes: each takes effect only if the table
/// does not already hold that `is_online`; effective changes go to the
/// table and the transitions stream, and are published on the device's
/// status channel when it is watched (by the caller's interest mirror, or
/// by a `ws:sub:{device}` count).
///
/// KEYS: status hash, transitions stream. ARGV: maxlen, count, then per
/// change: device, is_online, json, watched, channel.
pub(super) const TRANSITIONS: &str = r"
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
    if watched == '1' or redis.call('EXISTS', 'ws:sub:' .. device) == 1 then
      redis.call('PUBLISH', channel, json)
    end
  end
  out[k] = changed
end
return out
";

/// Takes deadlines due by the cutoff and, in the same step, takes each
/// device that is online offline: the status table, the transitions
/// stream (with the deadline that passed), and the status channel when
/// watched. A device that is already offline only loses its deadline.
/// Returns, per transition: device, source, the change's JSON.
///
/// KEYS: deadlines, status hash, transitions stream. ARGV: cutoff (ms),
/// limit, now (ms), stream maxlen.
pub(super) const SWEEP: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for i = 1, #due, 2 do
  local member, deadline = due[i], due[i + 1]
  redis.call('ZREM', KEYS[1], member)
  local kind, device = string.sub(member, 1, 1), string.sub(member, 3)
  local source = 'heartbeat_expired'
  if kind == 't' then source = 'timeout_expired' end
  local name = device
  local online = true
  local current = redis.call('HGET', KEYS[2], device)
  if current then
    local ok, decoded = pcall(cjson.decode, current)
    if ok then
      if tostring(decoded['is_online']) == '0' then online = false end
      if type(decoded['device_name']) == 'string' then name = decoded['device_name'] end
    end
  end
  if online then
    local json = '{"device_id":' .. cjson.encode(device) .. ',"device_name":' .. cjson.encode(name)
      .. ',"is_online":0,"timestamp":' .. ARGV[3] .. ',"source":"' .. source .. '"}'
    redis.call('HSET', KEYS[2], device, json)
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'device', device, 'change', json, 'deadline', deadline)
    if redis.call('EXISTS', 'ws:sub:' .. device) == 1 then
      redis.call('PUBLISH', 'device:' .. device .. ':status', json)
    end
    table.insert(out, device)
    table.insert(out, source)
    table.insert(out, json)
  end
end
return out
"#;
