"""The Redis round store's Lua scripts: each transition of a round is one script, so aggregators never interleave."""

# Per-round keys are built inside the scripts from the namespace (ARGV), because the round number
# is only known there; aggregator.keys.Keys builds the same names (tests check they agree).
# KEYS: seen, version, update hash, pins, payload key [, final payload, open transfers, transfer meta].
# ARGV: record id (client/update id: update ids are per client), header, (unused), now, namespace, base
# version, max staleness (-1: no limit), then (pin name, value)*: the federation's facts this update carries.
# The payload itself was SET beforehand under a key named by its sha256: passing megabytes through a
# script's arguments costs three times a plain SET. A chunked payload (eight keys) is the transfer's hash
# of chunks, renamed (not copied) to the update's payload key. The pins are checked and, when unset, set
# here, in the step that records the update: two aggregators recording at once cannot pin different facts,
# and an update that is not recorded pins nothing.
RECORD = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then
  local had = redis.call('HGET', KEYS[3], 'payload')
  if had and had ~= (KEYS[6] or KEYS[5]) then return 4 end
  return 0
end
local v = redis.call('GET', KEYS[2]) or '0'
local base = tonumber(ARGV[6])
if base > tonumber(v) then return 3 end
if tonumber(ARGV[7]) >= 0 and tonumber(v) - base > tonumber(ARGV[7]) then return 2 end
for i = 8, #ARGV, 2 do
  local pinned = redis.call('HGET', KEYS[4], ARGV[i])
  if pinned and pinned ~= ARGV[i + 1] then return 5 end
end
local payload = KEYS[5]
if #KEYS > 5 then
  if redis.call('EXISTS', KEYS[5]) == 0 then return -1 end
  redis.call('RENAME', KEYS[5], KEYS[6])
  payload = KEYS[6]
  redis.call('PERSIST', payload)
  redis.call('ZREM', KEYS[7], ARGV[1])
  redis.call('DEL', KEYS[8])
  redis.call('HSET', KEYS[3], 'chunked', '1')
elseif redis.call('PERSIST', KEYS[5]) == 0 and redis.call('EXISTS', KEYS[5]) == 0 then return -1 end
for i = 8, #ARGV, 2 do redis.call('HSETNX', KEYS[4], ARGV[i], ARGV[i + 1]) end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[3], 'header', ARGV[2], 'payload', payload)
redis.call('RPUSH', ARGV[5] .. 'round:' .. v .. ':updates', ARGV[1])
redis.call('SET', ARGV[5] .. 'round:' .. v .. ':opened', ARGV[4], 'NX')
return 1
"""

# A chunk's bookkeeping, before its bytes are written. KEYS: seen, transfer meta, open transfers, transfer,
# update hash, the payload key this update's bytes would have. ARGV: record id, signature, client, count,
# deadline, ttl (ms), most open transfers per client, in all (0: no limit), transfer meta key prefix, suffix.
# Returns 1 (go on), 0 (already counted), -1 (another header or chunking under this id), -2 (already
# counted with another payload: a replay), -3 (a new transfer past a bound on open transfers).
OPEN_TRANSFER = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then
  local had = redis.call('HGET', KEYS[5], 'payload')
  if had and had ~= KEYS[6] then return -2 end
  return 0
end
local sig = redis.call('HGET', KEYS[2], 'signature')
if not sig and tonumber(ARGV[8]) > 0 then
  local open = redis.call('ZRANGE', KEYS[3], 0, -1)
  if #open >= tonumber(ARGV[8]) then return -3 end
  local mine = 0
  for _, id in ipairs(open) do
    if redis.call('HGET', ARGV[9] .. id .. ARGV[10], 'client') == ARGV[3] then mine = mine + 1 end
  end
  if mine >= tonumber(ARGV[7]) then return -3 end
end
if not sig then
  redis.call('HSET', KEYS[2], 'signature', ARGV[2], 'client', ARGV[3], 'count', ARGV[4])
elseif sig ~= ARGV[2] then return -1 end
redis.call('PEXPIRE', KEYS[2], ARGV[6])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
return 1
"""

# Take one idle transfer off the open set and drop its chunks; only the caller whose ZREM succeeded reports.
# KEYS: open transfers, transfer, transfer meta. ARGV: record id.
EXPIRE_TRANSFER = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return false end
local got = redis.call('HLEN', KEYS[2])
local meta = redis.call('HMGET', KEYS[3], 'client', 'count')
redis.call('DEL', KEYS[2], KEYS[3])
return {got, meta[1] or '', meta[2] or '0'}
"""

# Take one update out of the open round (it could not be aggregated); its id stays in `seen`.
# KEYS: version, the round's update list, update hash. ARGV: round, record id.
DROP_UPDATE = """
if tonumber(redis.call('GET', KEYS[1]) or '0') ~= tonumber(ARGV[1]) then return 0 end
if redis.call('LREM', KEYS[2], 1, ARGV[2]) == 0 then return 0 end
local payload = redis.call('HGET', KEYS[3], 'payload')
if payload then redis.call('DEL', payload) end
redis.call('DEL', KEYS[3])
return 1
"""

ACQUIRE = """
if (redis.call('GET', KEYS[1]) or '0') ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local token = redis.call('INCR', KEYS[4])
redis.call('SET', KEYS[2], ARGV[2] .. '|' .. token, 'PX', ARGV[3])
redis.call('SET', KEYS[3], token)
return token
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: version, fence, lease, unpublished, history, releases(next)
# ARGV: round, token, consumed, record, now, namespace, n_adapters, (key, kind, payload)*, (client, header)*
# kind "v": the payload itself; kind "b": the key of a staged hash of chunks, adopted by renaming it.
COMMIT = """
local round = tonumber(ARGV[1])
if tonumber(redis.call('GET', KEYS[1]) or '0') ~= round then return 0 end
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
local consumed = tonumber(ARGV[3])
local ns = ARGV[6]
local cur = ns .. 'round:' .. round .. ':updates'
local nxt = ns .. 'round:' .. (round + 1) .. ':updates'
if consumed < 1 or consumed > redis.call('LLEN', cur) then return 0 end
local late = redis.call('LRANGE', cur, consumed, -1)
if #late > 0 then
  for _, id in ipairs(late) do redis.call('RPUSH', nxt, id) end
  redis.call('LTRIM', cur, 0, consumed - 1)
  redis.call('SET', ns .. 'round:' .. (round + 1) .. ':opened', ARGV[5], 'NX')
end
local n_adapters = tonumber(ARGV[7])
local i = 8
for _ = 1, n_adapters do
  if ARGV[i + 1] == 'b' then
    if redis.call('EXISTS', ARGV[i + 2]) == 0 then return -1 end
    redis.call('RENAME', ARGV[i + 2], ARGV[i])
    redis.call('PERSIST', ARGV[i])
  else
    redis.call('SET', ARGV[i], ARGV[i + 2])
  end
  i = i + 3
end
while i <= #ARGV do
  redis.call('HSET', KEYS[6], ARGV[i], ARGV[i + 1])
  i = i + 2
end
redis.call('SET', KEYS[1], round + 1)
redis.call('SADD', KEYS[4], round + 1)
redis.call('RPUSH', KEYS[5], ARGV[4])
redis.call('DEL', KEYS[3])
return 1
"""
