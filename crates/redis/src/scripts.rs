//! The Lua scripts: each is one atomic step on the keys of one room or one user (one cluster slot).
//!
//! Times come from Redis `TIME`, so all nodes agree on timestamps and expiry.

use std::sync::LazyLock;

use redis::Script;

/// Publish: dedup check, next offset, history append (capped, with TTL), dedup record, and delivery
/// on the room channel, in one step.
///
/// On Redis Cluster the metadata also records which master wrote it (`m`, the node id). When a
/// different master publishes — a replica promoted by a failover, which may lack the last writes
/// its master acknowledged — the epoch changes, so no client mistakes the new master's offsets for
/// the ones it saw before.
///
/// KEYS: meta, hist, dedup (the meta key again when there is no id).
/// ARGV: from_json, data_json, id_json, id_raw, history_size, history_ttl_secs, dedup_secs, channel,
/// publish command (PUBLISH or SPUBLISH), mode ('cluster' or 'standalone').
/// Returns {offset, epoch, duplicate(0|1)}.
pub static PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if ARGV[4] ~= '' and epoch then
  local seen = redis.call('GET', KEYS[3])
  if seen then return {tonumber(seen), epoch, 1} end
end
local t = redis.call('TIME')
if not epoch then
  epoch = string.format('%x%05x', tonumber(t[1]), tonumber(t[2]))
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'top', 0)
end
if ARGV[10] == 'cluster' then
  local me = redis.call('CLUSTER', 'MYID')
  local writer = redis.call('HGET', KEYS[1], 'm')
  if writer ~= me then
    if writer then epoch = string.format('%x%05x', tonumber(t[1]), tonumber(t[2])) end
    redis.call('HSET', KEYS[1], 'epoch', epoch, 'm', me)
  end
end
local offset = redis.call('HINCRBY', KEYS[1], 'top', 1)
local ts = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[5], offset .. '-0', 'f', ARGV[1], 'd', ARGV[2], 'i', ARGV[3], 't', ts)
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[6])
if ARGV[4] ~= '' then redis.call('SET', KEYS[3], offset, 'EX', ARGV[7]) end
redis.call(ARGV[9], ARGV[8], '{"k":"p","o":' .. offset .. ',"e":"' .. epoch .. '","t":' .. ts .. ',"f":' .. ARGV[1] .. ',"i":' .. ARGV[3] .. ',"d":' .. ARGV[2] .. '}')
return {offset, epoch, 0}
"#,
    )
});

/// Read: the room's position (creating its epoch if the room is new) and history entries.
///
/// KEYS: meta, hist. ARGV: mode ('latest' | 'after'), after_offset, limit, history_ttl_secs.
/// Returns {top, epoch, oldest_kept_offset_or_0, entries...} where entries are XRANGE replies with
/// offsets in `1..=top`, oldest first, none older than the history TTL.
pub static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local t = redis.call('TIME')
if not epoch then
  epoch = string.format('%x%05x', tonumber(t[1]), tonumber(t[2]))
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'top', 0)
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return {0, epoch, 0}
end
local top = tonumber(redis.call('HGET', KEYS[1], 'top'))
local min_ts = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[4]) * 1000
local limit = tonumber(ARGV[3])
local entries
if ARGV[1] == 'latest' then
  entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', limit)
  local n = #entries
  for i = 1, math.floor(n / 2) do entries[i], entries[n - i + 1] = entries[n - i + 1], entries[i] end
else
  entries = redis.call('XRANGE', KEYS[2], (tonumber(ARGV[2]) + 1) .. '-0', '+', 'COUNT', limit)
end
-- The oldest offset still kept and fresh: expired entries at the head count as lost.
local oldest = 0
local head = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
if head[1] then oldest = tonumber(string.match(head[1][1], '^(%d+)')) end
local out = {top, epoch, oldest}
for _, e in ipairs(entries) do
  local fields = e[2]
  local ts = 0
  for i = 1, #fields, 2 do if fields[i] == 't' then ts = tonumber(fields[i + 1]) end end
  if ts < min_ts then
    local off = tonumber(string.match(e[1], '^(%d+)'))
    if off >= oldest then oldest = off + 1; out[3] = oldest end
  else
    table.insert(out, e)
  end
end
return out
"#,
    )
});

/// Send a direct message: dedup check, expired-entry trim, capacity check, next seq, inbox append.
/// Delivery on the bus is done by the caller after this returns (the bus is another slot).
///
/// KEYS: inbox, seq, dedup (the inbox key again when there is no id).
/// ARGV: id_raw, inbox_max, inbox_ttl_secs, dedup_secs, from_json, data_json, id_json.
/// Returns {seq, duplicate(0|1), ts} or {-1, 0, 0} when the inbox is full.
pub static SEND_DIRECT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if ARGV[1] ~= '' then
  local seen = redis.call('GET', KEYS[3])
  if seen then return {tonumber(seen), 1, 0} end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local min_ts = now - tonumber(ARGV[3]) * 1000
for _ = 1, 100 do
  local head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  if not head[1] then break end
  local fields = head[1][2]
  local ts = 0
  for i = 1, #fields, 2 do if fields[i] == 't' then ts = tonumber(fields[i + 1]) end end
  if ts >= min_ts then break end
  redis.call('XDEL', KEYS[1], head[1][1])
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[2]) then return {-1, 0, 0} end
local seq = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], math.max(tonumber(ARGV[3]), 2592000))
local ts = string.format('%.0f', now)
redis.call('XADD', KEYS[1], seq .. '-0', 'f', ARGV[5], 'd', ARGV[6], 'i', ARGV[7], 't', ts)
redis.call('EXPIRE', KEYS[1], ARGV[3])
if ARGV[1] ~= '' then redis.call('SET', KEYS[3], seq, 'EX', ARGV[4]) end
return {seq, 0, ts}
"#,
    )
});

/// Record present connections of one room (a join, or the periodic refresh of this node's
/// connections), first removing entries whose node stopped refreshing them.
///
/// KEYS: conns zset, users hash. ARGV: expiry_ms_from_now, key_ttl_secs, mode ('add' records
/// entries; 'refresh' only extends entries that still exist, so it cannot undo a concurrent
/// remove), then pairs (member, user) where member is `user\x1fnode\x1fconn`.
/// Returns {newly_present_users_flags..., '', left_users...}: one 0/1 per pair, an empty separator,
/// then users whose last connection expired (their node died).
pub static PRESENCE_ADD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local left = {}
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, member in ipairs(dead) do
  local user = string.match(member, '^(.-)\31')
  if user and redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then
    redis.call('HDEL', KEYS[2], user)
    table.insert(left, user)
  end
end
if #dead > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) end
local out = {}
local expiry = now + tonumber(ARGV[1])
for i = 4, #ARGV, 2 do
  local first = 0
  if ARGV[3] == 'refresh' then
    redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
  elseif redis.call('ZADD', KEYS[1], expiry, ARGV[i]) == 1 and redis.call('HINCRBY', KEYS[2], ARGV[i + 1], 1) == 1 then
    first = 1
  end
  table.insert(out, first)
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
table.insert(out, '')
for _, user in ipairs(left) do
  -- A user who expired and re-appeared in this same call is not a leave.
  if not redis.call('HGET', KEYS[2], user) then table.insert(out, user) end
end
return out
"#,
    )
});

/// Remove one present connection. KEYS: conns, users. ARGV: member, user.
/// Returns 1 when it was the user's last connection in the room.
pub static PRESENCE_REMOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
local n = redis.call('HINCRBY', KEYS[2], ARGV[2], -1)
if n <= 0 then redis.call('HDEL', KEYS[2], ARGV[2]); return 1 end
return 0
"#,
    )
});

/// List present users, ignoring connections whose node stopped refreshing them.
/// KEYS: conns, users. Returns flat pairs user, count.
pub static PRESENCE_LIST: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
local counts = {}
local order = {}
for _, member in ipairs(live) do
  local user = string.match(member, '^(.-)\31')
  if user then
    if not counts[user] then counts[user] = 0; table.insert(order, user) end
    counts[user] = counts[user] + 1
  end
end
local out = {}
for _, user in ipairs(order) do table.insert(out, user); table.insert(out, counts[user]) end
return out
"#,
    )
});

/// Validate a session the seed's way (extend its TTL) and mark it `active` again if it was
/// `disconnected`, leaving its JSON byte for byte as it was otherwise.
/// KEYS: session. ARGV: ttl_secs. Returns the JSON (after the change) or nil.
pub static SESSION_VALIDATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local raw = redis.call('GET', KEYS[1])
if not raw then return false end
local ok, session = pcall(cjson.decode, raw)
if not ok or type(session) ~= 'table' then return raw end
if session['status'] == 'disconnected' then
  local replaced = string.gsub(raw, '("status"%s*:%s*)"disconnected"', '%1"active"', 1)
  raw = replaced
  redis.call('SET', KEYS[1], raw, 'EX', ARGV[1])
elseif session['status'] == 'active' then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return raw
"#,
    )
});

/// Change a session's status, keeping its TTL and the rest of its JSON byte for byte.
/// KEYS: session. ARGV: status as a JSON string. Returns 1 when changed, 0 when missing.
pub static SESSION_SET_STATUS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local replaced, n = string.gsub(raw, '("status"%s*:%s*)"[^"]*"', function(prefix) return prefix .. ARGV[1] end, 1)
if n == 0 then return 0 end
redis.call('SET', KEYS[1], replaced, 'KEEPTTL')
return 1
"#,
    )
});

/// Uncount a connection of a session; the last one marks the session `disconnected` (in place,
/// keeping its TTL). KEYS: counter, session. Returns 1 when it was the last connection.
pub static SESSION_DETACH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = redis.call('DECR', KEYS[1])
if n > 0 then return 0 end
redis.call('DEL', KEYS[1])
local raw = redis.call('GET', KEYS[2])
if raw then
  local replaced, changed = string.gsub(raw, '("status"%s*:%s*)"[^"]*"', '%1"disconnected"', 1)
  if changed > 0 then redis.call('SET', KEYS[2], replaced, 'KEEPTTL') end
end
return 1
"#,
    )
});

/// Every script, for loading them all when connecting.
pub fn all() -> [&'static Script; 9] {
    [
        &PUBLISH,
        &READ,
        &SEND_DIRECT,
        &PRESENCE_ADD,
        &PRESENCE_REMOVE,
        &PRESENCE_LIST,
        &SESSION_VALIDATE,
        &SESSION_SET_STATUS,
        &SESSION_DETACH,
    ]
}
