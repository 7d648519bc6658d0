//! The Lua scripts that make each cluster operation atomic in Redis. Each touches the keys of
//! one stream only (one hash tag), so they run unchanged on a Redis Cluster. Time comes from
//! Redis (`TIME`), so nodes whose clocks disagree still agree on leases and poll schedules.

/// Appends one change to a stream's log, if the caller's fence and base are current.
///
/// KEYS: meta, log, snap. ARGV: 1 fence (`0`: unfenced, a push), 2 the epoch the caller
/// publishes in (`0`: none yet), 3 the sequence number its change applies to, 4 kind (`p` or
/// `s`), 5 payload, 6 time of the change (ms), 7 the document after it (empty: not sent; a
/// checkpoint), 8 history (changes kept), 9 history bytes, 10 TTL of the stream's keys (ms),
/// 11 channel, 12 stream name, 13 the epoch to start if there is none (or on reset), 14 `1`
/// to start a new epoch even though one exists (a writer that cannot rebuild the log's
/// document), 15 the fingerprint of the writer's configuration of the stream (empty: none,
/// a dynamic stream).
///
/// Returns `{status, epoch, seq, pending}`: `ok` with the new sequence number and the patch
/// bytes logged since the last stored document; `fenced` when a newer lease exists; `stale`
/// when the log was claimed for another configuration of the stream (see [`CLAIM`]);
/// `conflict` with the current epoch and top when the caller's base is not the top.
pub const PUBLISH: &str = r"
local meta, log, snap = KEYS[1], KEYS[2], KEYS[3]
local fence = tonumber(ARGV[1])
if fence ~= 0 then
  local current = tonumber(redis.call('HGET', meta, 'fence') or '0')
  if current ~= fence then return {'fenced', '0', 0, 0} end
end
if ARGV[15] ~= '' then
  local config = redis.call('HGET', meta, 'config')
  if not config then
    redis.call('HSET', meta, 'config', ARGV[15])
  elseif config ~= ARGV[15] then
    return {'stale', '0', 0, 0}
  end
end
local epoch = redis.call('HGET', meta, 'epoch')
local seq = tonumber(redis.call('HGET', meta, 'seq') or '0')
local kind = ARGV[4]
if (not epoch) or ARGV[14] == '1' then
  if tonumber(ARGV[3]) ~= 0 or kind ~= 's' then return {'conflict', epoch or '0', seq, 0} end
  epoch = ARGV[13]
  seq = 0
  redis.call('DEL', log, snap)
  redis.call('HSET', meta, 'epoch', epoch, 'seq', 0, 'snap_seq', 0, 'pending', 0, 'log_bytes', 0)
elseif epoch ~= ARGV[2] or seq ~= tonumber(ARGV[3]) then
  return {'conflict', epoch, seq, 0}
end
local ttl = ARGV[10]
local payload = ARGV[5]
seq = seq + 1
redis.call('XADD', log, seq .. '-0', 'k', kind, 't', ARGV[6], 'p', payload)
local snap_seq = tonumber(redis.call('HGET', meta, 'snap_seq') or '0')
local pending = tonumber(redis.call('HGET', meta, 'pending') or '0')
if kind == 's' then
  redis.call('SET', snap, payload, 'PX', ttl)
  snap_seq, pending = seq, 0
elseif ARGV[7] ~= '' then
  redis.call('SET', snap, ARGV[7], 'PX', ttl)
  snap_seq, pending = seq, 0
else
  pending = pending + #payload
  redis.call('PEXPIRE', snap, ttl)
end
-- Trim: the oldest entries go while the log holds more than `history` changes or `history
-- bytes`, but never one after the stored document: those rebuild the current document.
local log_bytes = tonumber(redis.call('HGET', meta, 'log_bytes') or '0') + #payload
local history, budget = tonumber(ARGV[8]), tonumber(ARGV[9])
while true do
  local oldest = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)[1]
  if not oldest then break end
  local oldest_seq = tonumber(string.match(oldest[1], '^(%d+)'))
  if oldest_seq > snap_seq or (oldest_seq > seq - history and log_bytes <= budget) then break end
  local fields, size = oldest[2], 0
  for i = 1, #fields, 2 do
    if fields[i] == 'p' then size = #fields[i + 1] end
  end
  redis.call('XDEL', log, oldest[1])
  log_bytes = log_bytes - size
end
redis.call('HSET', meta, 'seq', seq, 'snap_seq', snap_seq, 'pending', pending, 'log_bytes', log_bytes, 'at', ARGV[6])
redis.call('HDEL', meta, 'failure')
redis.call('PEXPIRE', meta, ttl)
redis.call('PEXPIRE', log, ttl)
redis.call('PUBLISH', ARGV[11], 'c\n' .. ARGV[12] .. '\n' .. epoch .. '\n' .. seq .. '\n' .. kind .. '\n' .. ARGV[6] .. '\n' .. payload)
return {'ok', epoch, seq, pending}
";

/// Reads everything a node needs to serve a stream, in one consistent view: the meta hash,
/// the stored document, and the log from the first change history keeps (or the first after
/// the stored document, whichever is older).
///
/// KEYS: meta, log, snap. ARGV: 1 history (changes wanted).
///
/// Returns `{}` when the stream has no epoch, else `{meta (flat field/value list), document
/// or nil, entries}`.
pub const LOAD: &str = r"
local meta, log, snap = KEYS[1], KEYS[2], KEYS[3]
local fields = redis.call('HGETALL', meta)
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then return {} end
local seq = tonumber(redis.call('HGET', meta, 'seq') or '0')
local snap_seq = tonumber(redis.call('HGET', meta, 'snap_seq') or '0')
local from = math.min(snap_seq + 1, math.max(1, seq - tonumber(ARGV[1]) + 1))
local document = redis.call('GET', snap)
local entries = redis.call('XRANGE', log, from .. '-0', '+')
return {fields, document, entries}
";

/// Takes a stream's lease if it is free (or renews it if the caller holds it), unless the
/// stream's log was claimed for another configuration than the caller's.
///
/// KEYS: lease, meta. ARGV: 1 node, 2 lease TTL (ms), 3 TTL of the stream's keys (ms), 4 the
/// fingerprint of the caller's configuration of the stream (empty: none, a dynamic stream),
/// recorded as the node's (`cfg:{node}`) so a holder hands the lease only to a node that
/// runs the log's configuration; the first taker of a stream without one records it.
///
/// Returns `{1, fence, now, meta}` when the caller holds the lease (fences only grow: the
/// first is the time in ms, so a stream whose keys expired never reuses an old fence),
/// `{0, holder, now}` when another node holds it, `{2, '', now}` when the log belongs to
/// another configuration.
pub const ACQUIRE: &str = r"
local lease, meta = KEYS[1], KEYS[2]
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local config = redis.call('HGET', meta, 'config')
if ARGV[4] ~= '' then
  redis.call('HSET', meta, 'cfg:' .. ARGV[1], ARGV[4])
  if redis.call('PTTL', meta) < 0 then redis.call('PEXPIRE', meta, ARGV[3]) end
  if config and config ~= ARGV[4] then return {2, '', now} end
end
local current = redis.call('GET', lease)
if current then
  local holder, fence = string.match(current, '^(.*) (%d+)$')
  if holder ~= ARGV[1] then return {0, holder or '', now} end
  redis.call('PEXPIRE', lease, ARGV[2])
  return {1, fence, now, redis.call('HGETALL', meta)}
end
if ARGV[4] ~= '' and not config then
  redis.call('HSET', meta, 'config', ARGV[4])
end
if not redis.call('HGET', meta, 'fence') then
  redis.call('HSET', meta, 'fence', now)
end
local fence = redis.call('HINCRBY', meta, 'fence', 1)
redis.call('SET', lease, ARGV[1] .. ' ' .. fence, 'PX', ARGV[2])
redis.call('PEXPIRE', meta, ARGV[3])
return {1, tostring(fence), now, redis.call('HGETALL', meta)}
";

/// Claims a stream's log for a configuration of the stream, as a node loads it (at start and
/// at each reload): the log's content depends on the stream's source (its kind, URL, format
/// and diff options), so one configuration writes it at a time, the last one loaded.
///
/// KEYS: meta, lease, log, snap. ARGV: 1 the configuration's fingerprint, 2 node, 3 TTL of
/// the stream's keys (ms), 4 channel, 5 stream.
///
/// Records the fingerprint as the node's (`cfg:{node}`). When the log has no configuration
/// yet (a new stream, or keys of an earlier version) the fingerprint is recorded and the log
/// kept. When it has another, the log written from that configuration ends: its epoch, log,
/// document and poll state go (the next write starts a new epoch with a snapshot, which
/// every node's follower loads), the fence moves on (the holder's poll records and health
/// writes are refused) and the lease is freed and the release announced (its holder stops,
/// nodes running this configuration take it). Nodes with another fingerprint then neither
/// take the lease nor append ([`ACQUIRE`], [`PUBLISH`]) until they load this one.
///
/// Returns `same`, `recorded` or `claimed`.
pub const CLAIM: &str = r"
local meta, lease, log, snap = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local fingerprint = ARGV[1]
redis.call('HSET', meta, 'cfg:' .. ARGV[2], fingerprint)
if redis.call('PTTL', meta) < 0 then redis.call('PEXPIRE', meta, ARGV[3]) end
local config = redis.call('HGET', meta, 'config')
if config == fingerprint then return 'same' end
redis.call('HSET', meta, 'config', fingerprint)
if not config then return 'recorded' end
redis.call('HDEL', meta, 'epoch', 'seq', 'snap_seq', 'pending', 'log_bytes', 'at', 'failure',
  'etag', 'last_modified', 'last_poll')
if redis.call('HEXISTS', meta, 'fence') == 1 then redis.call('HINCRBY', meta, 'fence', 1) end
redis.call('DEL', log, snap, lease)
redis.call('PUBLISH', ARGV[4], 'l\n' .. ARGV[5])
return 'claimed'
";

/// Extends a lease the caller holds with this fence. KEYS: lease. ARGV: node, fence, TTL
/// (ms). Returns 1, or 0 when the lease is no longer the caller's.
pub const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] .. ' ' .. ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
";

/// Gives up a lease the caller holds and says so on the channel, so the next node takes it
/// now. KEYS: lease. ARGV: node, fence, channel, stream. Returns 1, or 0 if not held.
pub const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] .. ' ' .. ARGV[2] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[3], 'l\n' .. ARGV[4])
  return 1
end
return 0
";

/// Records a node as live until now + TTL, forgets nodes whose time ran out, and lists the
/// live ones. KEYS: nodes. ARGV: node, TTL (ms), channel; an empty TTL removes the node
/// instead and says so on the channel, so the others rank the streams without it at once.
pub const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if ARGV[2] == '' then
  if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
    redis.call('PUBLISH', ARGV[3], 'n\n' .. ARGV[1])
  end
else
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
";

/// Records what the holder's last poll learned, if its fence is current: the validators of
/// the conditional request, when the poll started (Redis time), the count of upstream
/// requests. KEYS: meta, log, snap. ARGV: fence, etag, last-modified, TTL (ms).
/// Returns the poll's time, or 0 when fenced.
pub const POLLED: &str = r"
if tonumber(redis.call('HGET', KEYS[1], 'fence') or '0') ~= tonumber(ARGV[1]) then return 0 end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('HSET', KEYS[1], 'etag', ARGV[2], 'last_modified', ARGV[3], 'last_poll', now)
redis.call('HINCRBY', KEYS[1], 'polls', 1)
for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ARGV[4]) end
return now
";

/// Records (or clears) the upstream's failure and announces it, if the holder's fence is
/// current. KEYS: meta. ARGV: fence, failure JSON (empty: recovered), channel, message.
/// Returns 1, or 0 when fenced.
pub const HEALTH: &str = r"
if tonumber(redis.call('HGET', KEYS[1], 'fence') or '0') ~= tonumber(ARGV[1]) then return 0 end
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], 'failure')
else
  redis.call('HSET', KEYS[1], 'failure', ARGV[2])
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
";

/// A rate limit shared by the cluster, as GCRA (the generic cell rate algorithm, as governor
/// applies it locally): one timestamp per limit, the theoretical arrival time of the next
/// request. KEYS: the limit's key. ARGV: 1 emission interval (µs: the period divided by the
/// quota), 2 burst (requests allowed at once).
///
/// Returns 0 when the request may go now (and counts it), else the µs to wait.
pub const RATE: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local allow_at = tat - interval * (burst - 1)
if now < allow_at then return allow_at - now end
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
return 0
";

/// Counts a proxy token's open connections across the cluster: one hash field per node,
/// `count:expiry_ms`, refreshed by its node; a node that died stops counting once its entry
/// expires. KEYS: the token's hash. ARGV: 1 node, 2 change (`1` to admit one more, `-1` to
/// release one, `0` to refresh), 3 limit, 4 entry TTL (ms).
///
/// Returns the cluster-wide count after the change, or -1 when admitting would pass the limit
/// (nothing changes then).
pub const CONNECTIONS: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local node, change, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local entries = redis.call('HGETALL', KEYS[1])
local total, mine = 0, 0
for i = 1, #entries, 2 do
  local count, expiry = string.match(entries[i + 1], '^(%d+):(%d+)$')
  count, expiry = tonumber(count or '0'), tonumber(expiry or '0')
  if entries[i] == node then
    mine = count
  elseif expiry < now then
    redis.call('HDEL', KEYS[1], entries[i])
  else
    total = total + count
  end
end
if change > 0 and total + mine + change > limit then return -1 end
mine = math.max(0, mine + change)
if mine == 0 then
  redis.call('HDEL', KEYS[1], node)
else
  redis.call('HSET', KEYS[1], node, mine .. ':' .. (now + tonumber(ARGV[4])))
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return total + mine
";

/// Records (or withdraws) a node's demand for a stream polled on demand: one hash field per
/// node, `expiry_ms:period_ms`, refreshed while the node has subscribers; entries of nodes
/// that stopped refreshing expire. KEYS: the stream's demand hash. ARGV: 1 node, 2 the period
/// its subscribers ask for in ms (empty: withdraw), 3 entry TTL (ms).
///
/// Returns the live entries as a flat `node, period_ms` list.
pub const DEMAND: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], (now + tonumber(ARGV[3])) .. ':' .. ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
local entries = redis.call('HGETALL', KEYS[1])
local live = {}
for i = 1, #entries, 2 do
  local expiry, period = string.match(entries[i + 1], '^(%d+):(%d+)$')
  if tonumber(expiry or '0') < now then
    redis.call('HDEL', KEYS[1], entries[i])
  else
    live[#live + 1] = entries[i]
    live[#live + 1] = period
  end
end
return live
";

/// Forgets a stream nobody wants any more (the last node's linger ran out): its log, document
/// and meta go, unless another node asked for it meanwhile or holds its lease. KEYS: meta,
/// log, snap, lease, demand. ARGV: the evicting node (its own entry, being withdrawn, does
/// not count). Returns 1 when deleted.
pub const EVICT: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
local entries = redis.call('HGETALL', KEYS[5])
for i = 1, #entries, 2 do
  local expiry = string.match(entries[i + 1], '^(%d+):')
  if entries[i] ~= ARGV[1] and tonumber(expiry or '0') >= now then return 0 end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[5])
return 1
";

/// The secret that names dynamic streams, the same on every node: created once by whichever
/// node asks first. KEYS: its key. ARGV: a fresh random secret (hex). Returns the secret.
pub const IDENTITY: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
";
