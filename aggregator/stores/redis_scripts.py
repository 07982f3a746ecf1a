"""The Redis round store's Lua scripts: each transition of a round is one script, so aggregators never interleave."""

# Every script names its KEYS and ARGV in locals on its first lines; the callers (aggregator.stores.redis) pass
# them in that order. A script touches only the keys it is given (Redis Cluster routes a script by its keys and
# refuses one that reaches past them), all of one federation and so of one hash slot (aggregator.keys). Where a
# key depends on state read inside the script (the open round's number), the caller reads that state first,
# passes the keys it implies and the value it read, and the script answers "read again" if it changed.
#
# RECORD: count an update once. The payload was SET beforehand under a key named by its sha256 (passing
# megabytes through a script's arguments costs three times a plain SET), or, chunked, is the transfer's hash of
# chunks, renamed (not copied) to the update's payload key. The pins are checked and, when unset, set here, in
# the step that records the update: two aggregators recording at once cannot pin different facts, and an update
# that is not recorded pins nothing. `round_updates` and `round_opened` are the keys of the round open at
# `expected` (the version the caller read). Returns 1 recorded, 0 already counted, 2 stale, 3 from the future,
# 4 a replay (counted with another payload), 5 a pin conflict, 6 the version is no longer `expected` (read it
# again), -1 the payload is gone.
RECORD = """
local seen, version, update, pins = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local staged, payload, open_transfers, transfer_meta = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local round_updates, round_opened, transfer_owners = KEYS[9], KEYS[10], KEYS[11]
local id, header, now, expected = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local base, max_staleness, chunked = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7] == '1'
local first_pin = 8  -- then (pin name, value)*: the federation's facts this update carries
if redis.call('SISMEMBER', seen, id) == 1 then
  local had = redis.call('HGET', update, 'payload')
  if had and had ~= payload then return 4 end
  return 0
end
-- Chunks that expired (reported incomplete) or were dropped: gone, before any other verdict would count it twice.
if chunked and redis.call('EXISTS', staged) == 0 then return -1 end
local v = redis.call('GET', version) or '0'
if v ~= expected then return 6 end
if base > tonumber(v) then return 3 end
if max_staleness >= 0 and tonumber(v) - base > max_staleness then return 2 end
for i = first_pin, #ARGV, 2 do
  local pinned = redis.call('HGET', pins, ARGV[i])
  if pinned and pinned ~= ARGV[i + 1] then return 5 end
end
if chunked then
  redis.call('RENAME', staged, payload)
  redis.call('PERSIST', payload)
  redis.call('ZREM', open_transfers, id)
  redis.call('HDEL', transfer_owners, id)
  redis.call('DEL', transfer_meta)
  redis.call('HSET', update, 'chunked', '1')
elseif redis.call('PERSIST', payload) == 0 and redis.call('EXISTS', payload) == 0 then return -1 end
for i = first_pin, #ARGV, 2 do redis.call('HSETNX', pins, ARGV[i], ARGV[i + 1]) end
redis.call('SADD', seen, id)
redis.call('HSET', update, 'header', header, 'payload', payload)
redis.call('RPUSH', round_updates, id)
redis.call('SET', round_opened, now, 'NX')
return 1
"""

# OPEN_TRANSFER: a chunk's bookkeeping, before its bytes are written. Returns 1 (go on), 0 (already counted),
# -1 (another header or chunking under this id), -2 (already counted with another payload: a replay), -3 (a new
# transfer past a bound on open transfers). `transfer_owners` names each open transfer's client, so the bound
# per client is counted without reading the other transfers' own keys.
OPEN_TRANSFER = """
local seen, meta, open_transfers, update, payload = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local transfer_owners = KEYS[6]
local id, signature, client, count, deadline, ttl_ms = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local per_client, in_all = tonumber(ARGV[7]), tonumber(ARGV[8])  -- in_all 0: no limit
if redis.call('SISMEMBER', seen, id) == 1 then
  local had = redis.call('HGET', update, 'payload')
  if had and had ~= payload then return -2 end
  return 0
end
local sig = redis.call('HGET', meta, 'signature')
if not sig and in_all > 0 then
  if redis.call('ZCARD', open_transfers) >= in_all then return -3 end
  local mine = 0
  for _, owner in ipairs(redis.call('HVALS', transfer_owners)) do
    if owner == client then mine = mine + 1 end
  end
  if mine >= per_client then return -3 end
end
if not sig then
  redis.call('HSET', meta, 'signature', signature, 'client', client, 'count', count)
elseif sig ~= signature then return -1 end
redis.call('PEXPIRE', meta, ttl_ms)
redis.call('ZADD', open_transfers, deadline, id)
redis.call('HSET', transfer_owners, id, client)
return 1
"""

# PUT_CHUNK: write one chunk of an open transfer (never over one already there) and keep the transfer alive.
# Returns {1 if it was new, the chunks the transfer now holds}.
PUT_CHUNK = """
local transfer = KEYS[1]
local index, body, ttl_ms = ARGV[1], ARGV[2], ARGV[3]
local added = redis.call('HSETNX', transfer, index, body)
redis.call('PEXPIRE', transfer, ttl_ms)
return {added, redis.call('HLEN', transfer)}
"""

# EXPIRE_TRANSFER: take one idle transfer off the open set and drop its chunks; only the caller whose ZREM
# succeeded reports it. Returns {chunks received, client, chunk count}, or false.
EXPIRE_TRANSFER = """
local open_transfers, transfer, meta, transfer_owners = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id = ARGV[1]
redis.call('HDEL', transfer_owners, id)
if redis.call('ZREM', open_transfers, id) == 0 then return false end
local got = redis.call('HLEN', transfer)
local info = redis.call('HMGET', meta, 'client', 'count')
redis.call('DEL', transfer, meta)
return {got, info[1] or '', info[2] or '0'}
"""

# DROP_UPDATE: take one update out of the open round (it could not be aggregated); its id stays in `seen`.
# `payload` is the key the caller read from the update's hash (a recorded update's payload key never changes).
# Fenced like COMMIT: only the holder of the round's newest token may drop. Returns 1 dropped, 0 not (the round
# moved on, the lease is another's, or the update is not in it), -1 the payload key is not the one recorded (read
# it again).
DROP_UPDATE = """
local version, fence, round_updates, update, payload = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local round, token, id = tonumber(ARGV[1]), ARGV[2], ARGV[3]
if tonumber(redis.call('GET', version) or '0') ~= round then return 0 end
if redis.call('GET', fence) ~= token then return 0 end
if (redis.call('HGET', update, 'payload') or payload) ~= payload then return -1 end
if redis.call('LREM', round_updates, 1, id) == 0 then return 0 end
redis.call('DEL', payload, update)
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

# COMMIT: turn a leased round into the next version. After the fixed KEYS come n_adapters pairs (the adapter's
# key, its source): a source other than the key itself is a staged hash of chunks, adopted by renaming it; a
# source equal to the key takes its bytes from the matching ARGV. After the fixed ARGV come the n_adapters
# payloads ("" for a staged one), then (client, header) pairs of the version's releases. Updates recorded past
# the `consumed` the finaliser aggregated move on to the next round. Returns 1 committed, 0 not (the round
# moved on or the lease is another's), -1 a staged adapter expired.
COMMIT = """
local version, fence, lease, unpublished, history, releases = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local cur, nxt, nxt_opened = KEYS[7], KEYS[8], KEYS[9]
local first_adapter_key = 10
local round, token, consumed, record = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[4]
local now, n_adapters = ARGV[5], tonumber(ARGV[6])
local first_payload = 7
if tonumber(redis.call('GET', version) or '0') ~= round then return 0 end
if redis.call('GET', fence) ~= token then return 0 end
if consumed < 1 or consumed > redis.call('LLEN', cur) then return 0 end
local late = redis.call('LRANGE', cur, consumed, -1)
if #late > 0 then
  for _, id in ipairs(late) do redis.call('RPUSH', nxt, id) end
  redis.call('LTRIM', cur, 0, consumed - 1)
  redis.call('SET', nxt_opened, now, 'NX')
end
for j = 0, n_adapters - 1 do
  local key, source = KEYS[first_adapter_key + 2 * j], KEYS[first_adapter_key + 2 * j + 1]
  if source ~= key then
    if redis.call('EXISTS', source) == 0 then return -1 end
    redis.call('RENAME', source, key)
    redis.call('PERSIST', key)
  else
    redis.call('SET', key, ARGV[first_payload + j])
  end
end
local i = first_payload + n_adapters
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
