"""The Redis round store's Lua scripts: each transition of a round is one script, so aggregators never interleave."""

# Every script names its KEYS and ARGV in locals on its first lines; the callers (aggregator.stores.redis) pass
# them in that order. Per-round keys are built inside the scripts from the namespace, because the round number
# is only known there (it is read in the same atomic step); aggregator.keys.Keys builds the same names (tests
# check they agree).
#
# RECORD: count an update once. The payload was SET beforehand under a key named by its sha256 (passing
# megabytes through a script's arguments costs three times a plain SET), or, chunked, is the transfer's hash of
# chunks, renamed (not copied) to the update's payload key. The pins are checked and, when unset, set here, in
# the step that records the update: two aggregators recording at once cannot pin different facts, and an update
# that is not recorded pins nothing. Returns 1 recorded, 0 already counted, 2 stale, 3 from the future,
# 4 a replay (counted with another payload), 5 a pin conflict, -1 the payload is gone.
RECORD = """
local seen, version, update, pins = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local staged, payload, open_transfers, transfer_meta = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local id, header, now, ns = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local base, max_staleness, chunked = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7] == '1'
local first_pin = 8  -- then (pin name, value)*: the federation's facts this update carries
if redis.call('SISMEMBER', seen, id) == 1 then
  local had = redis.call('HGET', update, 'payload')
  if had and had ~= payload then return 4 end
  return 0
end
local v = redis.call('GET', version) or '0'
if base > tonumber(v) then return 3 end
if max_staleness >= 0 and tonumber(v) - base > max_staleness then return 2 end
for i = first_pin, #ARGV, 2 do
  local pinned = redis.call('HGET', pins, ARGV[i])
  if pinned and pinned ~= ARGV[i + 1] then return 5 end
end
if chunked then
  if redis.call('EXISTS', staged) == 0 then return -1 end
  redis.call('RENAME', staged, payload)
  redis.call('PERSIST', payload)
  redis.call('ZREM', open_transfers, id)
  redis.call('DEL', transfer_meta)
  redis.call('HSET', update, 'chunked', '1')
elseif redis.call('PERSIST', payload) == 0 and redis.call('EXISTS', payload) == 0 then return -1 end
for i = first_pin, #ARGV, 2 do redis.call('HSETNX', pins, ARGV[i], ARGV[i + 1]) end
redis.call('SADD', seen, id)
redis.call('HSET', update, 'header', header, 'payload', payload)
local round = ns .. 'round:' .. v  -- the open round's keys
redis.call('RPUSH', round .. ':updates', id)
redis.call('SET', round .. ':opened', now, 'NX')
return 1
"""

# OPEN_TRANSFER: a chunk's bookkeeping, before its bytes are written. Returns 1 (go on), 0 (already counted),
# -1 (another header or chunking under this id), -2 (already counted with another payload: a replay), -3 (a new
# transfer past a bound on open transfers). Other transfers' meta keys are read by the name their ids give
# (prefix .. id .. suffix): which transfers are open is only known inside the script.
OPEN_TRANSFER = """
local seen, meta, open_transfers, update, payload = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local id, signature, client, count, deadline, ttl_ms = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local per_client, in_all = tonumber(ARGV[7]), tonumber(ARGV[8])  -- in_all 0: no limit
local meta_prefix, meta_suffix = ARGV[9], ARGV[10]
if redis.call('SISMEMBER', seen, id) == 1 then
  local had = redis.call('HGET', update, 'payload')
  if had and had ~= payload then return -2 end
  return 0
end
local sig = redis.call('HGET', meta, 'signature')
if not sig and in_all > 0 then
  local open = redis.call('ZRANGE', open_transfers, 0, -1)
  if #open >= in_all then return -3 end
  local mine = 0
  for _, other in ipairs(open) do
    if redis.call('HGET', meta_prefix .. other .. meta_suffix, 'client') == client then mine = mine + 1 end
  end
  if mine >= per_client then return -3 end
end
if not sig then
  redis.call('HSET', meta, 'signature', signature, 'client', client, 'count', count)
elseif sig ~= signature then return -1 end
redis.call('PEXPIRE', meta, ttl_ms)
redis.call('ZADD', open_transfers, deadline, id)
return 1
"""

# EXPIRE_TRANSFER: take one idle transfer off the open set and drop its chunks; only the caller whose ZREM
# succeeded reports it. Returns {chunks received, client, chunk count}, or false.
EXPIRE_TRANSFER = """
local open_transfers, transfer, meta = KEYS[1], KEYS[2], KEYS[3]
local id = ARGV[1]
if redis.call('ZREM', open_transfers, id) == 0 then return false end
local got = redis.call('HLEN', transfer)
local info = redis.call('HMGET', meta, 'client', 'count')
redis.call('DEL', transfer, meta)
return {got, info[1] or '', info[2] or '0'}
"""

# DROP_UPDATE: take one update out of the open round (it could not be aggregated); its id stays in `seen`.
DROP_UPDATE = """
local version, round_updates, update = KEYS[1], KEYS[2], KEYS[3]
local round, id = tonumber(ARGV[1]), ARGV[2]
if tonumber(redis.call('GET', version) or '0') ~= round then return 0 end
if redis.call('LREM', round_updates, 1, id) == 0 then return 0 end
local payload = redis.call('HGET', update, 'payload')
if payload then redis.call('DEL', payload) end
redis.call('DEL', update)
return 1
"""

# ACQUIRE: the finalising lease of a round, with a fencing token (0 when the round is not open or is leased).
ACQUIRE = """
local version, lease, fence, tokens = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local round, owner, ttl_ms = ARGV[1], ARGV[2], ARGV[3]
if (redis.call('GET', version) or '0') ~= round then return 0 end
if redis.call('EXISTS', lease) == 1 then return 0 end
local token = redis.call('INCR', tokens)
redis.call('SET', lease, owner .. '|' .. token, 'PX', ttl_ms)
redis.call('SET', fence, token)
return token
"""

# RELEASE: drop a lease only if it is still the caller's (owner|token).
RELEASE = """
local lease, holder = KEYS[1], ARGV[1]
if redis.call('GET', lease) == holder then return redis.call('DEL', lease) end
return 0
"""

# COMMIT: turn a leased round into the next version. After the fixed ARGV come n_adapters triples (key, kind,
# payload) — kind "v": the payload itself; kind "b": the key of a staged hash of chunks, adopted by renaming it —
# then (client, header) pairs of the version's releases. Updates recorded past the `consumed` the finaliser
# aggregated move on to the next round. Returns 1 committed, 0 not (the round moved on or the lease is
# another's), -1 a staged adapter expired.
COMMIT = """
local version, fence, lease, unpublished, history, releases = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local round, token, consumed, record = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[4]
local now, ns, n_adapters = ARGV[5], ARGV[6], tonumber(ARGV[7])
local first_adapter = 8
if tonumber(redis.call('GET', version) or '0') ~= round then return 0 end
if redis.call('GET', fence) ~= token then return 0 end
local cur = ns .. 'round:' .. round .. ':updates'
local nxt = ns .. 'round:' .. (round + 1) .. ':updates'
if consumed < 1 or consumed > redis.call('LLEN', cur) then return 0 end
local late = redis.call('LRANGE', cur, consumed, -1)
if #late > 0 then
  for _, id in ipairs(late) do redis.call('RPUSH', nxt, id) end
  redis.call('LTRIM', cur, 0, consumed - 1)
  redis.call('SET', ns .. 'round:' .. (round + 1) .. ':opened', now, 'NX')
end
local i = first_adapter
for _ = 1, n_adapters do
  local key, kind, body = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if kind == 'b' then
    if redis.call('EXISTS', body) == 0 then return -1 end
    redis.call('RENAME', body, key)
    redis.call('PERSIST', key)
  else
    redis.call('SET', key, body)
  end
  i = i + 3
end
while i <= #ARGV do
  redis.call('HSET', releases, ARGV[i], ARGV[i + 1])
  i = i + 2
end
redis.call('SET', version, round + 1)
redis.call('SADD', unpublished, round + 1)
redis.call('RPUSH', history, record)
redis.call('DEL', lease)
return 1
"""
