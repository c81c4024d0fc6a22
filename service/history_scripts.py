"""The history store's two Lua scripts and the design notes behind them (`service.history_store` runs them).

Both are plain text sent with EVALSHA (loaded on first use); they touch only one user's keys per user
entry, so on Redis Cluster a call that groups users of one hash slot is allowed.
"""

# KEYS: 5 per user (pos, neg, seq, dedupe, dedupe_hash), users in call order. ARGV: cap, ttl_s,
# dedupe_ttl_s, dedupe_max_ids, the events' text, then one per event: '' (no event id) or the 16 hex
# digits of the event's payload hash .. '=' .. event_id (the dedupe member is '=' .. event_id).
# The events' text holds, per user in KEYS order, a line with his event count, then per event two
# lines: ('p' or 'n') .. timestamp, and the payload (compact JSON: it never holds a raw newline;
# event ids may, so they travel as arguments of their own). Returns per event, in that order,
# 1 (accepted) / 0 (duplicate) / 2 (dropped: older than the newest cap-many of its history, so
# trimmed at once; its id is still remembered) / 3 (conflict: the id was seen with another payload
# hash; nothing written).
#
# The dedupe set is capped: at most dedupe_max_ids ids per user, the newest (by expiry, i.e. by when
# they were first seen, to the microsecond); the payload hash of each id lives in the dedupe_hash HASH
# and leaves it with its id.
#
# Every user's keys get what the one-user-per-call script gave them: an id is a duplicate while
# its dedupe entry has not expired, accepted events take the next arrival counters in order, both
# histories are kept within `cap` and all keys' TTLs refreshed. What makes it cheaper per event:
# - one call for many users: no per-user EVALSHA (parsing, script lookup, Lua call set-up);
# - one text argument instead of three per event: cheaper for the client to send and for Redis
#   to take apart;
# - numbers reach redis.call as strings: a Lua number argument is formatted with '%.17g' on
#   every call;
# - `ZADD NX` answers "seen before?" and records the id in one command; an entry that is still
#   there but expired (purged lazily) is re-armed and the event accepted;
# - dedupe expiries are integral microseconds (exact in a double up to 2**53 µs, the year 2255): a
#   small sorted set (listpack) stores an integral score as an integer, so finding a position does
#   not parse a decimal string per entry;
# - expired ids are purged when the user's counter passes a multiple of 64, not on every write
#   (the set holds at most 64 expired ids beyond the live ones);
# - one INCRBY and one ZADD per user and polarity, not one per event;
# - no trim while the user's counter is within cap (nothing to remove: see the script).
APPEND_SCRIPT = """
local cap = tonumber(ARGV[1])
local trim_rank = tostring(-(cap + 1))
local ttl = ARGV[2]
local dttl = ARGV[3]
local dmax = tonumber(ARGV[4])
local text = ARGV[5]
local t = redis.call('TIME')
-- Dedupe expiries are integral microseconds (server clock), plus the event's index in this call, so the
-- set orders ids by arrival (trimmed to the newest dmax by rank). Scores under 1e12 are expiries in whole
-- seconds, as an earlier version of this script wrote them, and are read as such.
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local find, sub, byte, format = string.find, string.sub, string.byte, string.format
local expiry0 = (tonumber(t[1]) + tonumber(dttl) + 1) * 1000000 + tonumber(t[2])
local out = {}
-- Trim a history to cap; a fresh event that fell out at once (older than the newest cap-many) is
-- answered 2 (dropped), not 1: it was never readable. scored: score, member pairs of the fresh events
-- of that history, es: their indices in out.
local function trim(key, scored, es)
  if redis.call('ZREMRANGEBYRANK', key, '0', trim_rank) > 0 and #es > 0 then
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    local m0, s0 = first[1], tonumber(first[2])
    for j = 1, #es do
      local s = tonumber(scored[2 * j - 1])
      if s < s0 or (s == s0 and scored[2 * j] < m0) then out[es[j]] = 2 end
    end
  end
end
-- Forget ids (members of the dedupe set) and their payload hashes; unpack() is bounded: 1000 a call.
local function forget(kded, kdh, gone)
  for lo = 1, #gone, 1000 do
    local hi = math.min(lo + 999, #gone)
    redis.call('HDEL', kdh, unpack(gone, lo, hi))
    redis.call('ZREM', kded, unpack(gone, lo, hi))
  end
end
local function zadd(key, scored)
  -- unpack() is bounded by the Lua stack: at most 500 members per ZADD
  for lo = 1, #scored, 1000 do
    redis.call('ZADD', key, unpack(scored, lo, math.min(lo + 999, #scored)))
  end
end
local at = 1  -- read position in text
local e = 0  -- events read so far
for u = 0, #KEYS / 5 - 1 do
  local kpos, kneg, kseq, kded, kdh = KEYS[5 * u + 1], KEYS[5 * u + 2], KEYS[5 * u + 3], KEYS[5 * u + 4],
    KEYS[5 * u + 5]
  local stop = find(text, '\\n', at, true)
  local n = tonumber(sub(text, at, stop - 1))
  at = stop + 1
  local fresh = {}
  local fresh_e = {}  -- index in out of each fresh event
  local ids = false
  for _ = 1, n do
    e = e + 1
    local head_end = find(text, '\\n', at, true)
    local payload_end = find(text, '\\n', head_end + 1, true)
    local arg = ARGV[5 + e]
    local ok = true
    local seen = 0  -- answer when not ok: 0 duplicate, 3 conflict
    if arg ~= '' then
      ids = true
      local h, id = sub(arg, 1, 16), sub(arg, 17)
      local expiry = format('%d', expiry0 + e)
      if redis.call('ZADD', kded, 'NX', expiry, id) == 0 then
        local until_ = tonumber(redis.call('ZSCORE', kded, id))
        if until_ < 1e12 then until_ = until_ * 1000000 end
        if until_ > now then
          ok = false
          local stored = redis.call('HGET', kdh, id)
          if stored and stored ~= h then seen = 3 end
        else
          redis.call('ZADD', kded, expiry, id)
          redis.call('HSET', kdh, id, h)
        end
      else
        redis.call('HSET', kdh, id, h)
      end
    end
    if ok then
      fresh[#fresh + 1] = at  -- 'p'/'n' at `at`, timestamp up to head_end, then the payload
      fresh[#fresh + 1] = head_end
      fresh[#fresh + 1] = payload_end
      fresh_e[#fresh_e + 1] = e
      out[e] = 1
    else
      out[e] = seen
    end
    at = payload_end + 1
  end
  local nfresh = #fresh / 3
  if nfresh > 0 then
    local total = redis.call('INCRBY', kseq, format('%d', nfresh))
    local s = total - nfresh
    local pos, neg, pos_e, neg_e = {}, {}, {}, {}
    for j = 1, nfresh do
      local from, head_end, payload_end = fresh[3 * j - 2], fresh[3 * j - 1], fresh[3 * j]
      local z, ze = neg, neg_e
      if byte(text, from) == 112 then z, ze = pos, pos_e end  -- 'p'
      z[#z + 1] = sub(text, from + 1, head_end - 1)
      z[#z + 1] = format('%016d:%s', s + j, sub(text, head_end + 1, payload_end - 1))
      ze[#ze + 1] = fresh_e[j]
    end
    if #pos > 0 then zadd(kpos, pos) end
    if #neg > 0 then zadd(kneg, neg) end
    -- The counter counts every event ever added to either history (it is set and expires with
    -- them): while it is within cap, neither history can be longer than cap.
    if total > cap then
      trim(kpos, pos, pos_e)
      trim(kneg, neg, neg_e)
    end
    if ids and math.floor(s / 64) ~= math.floor(total / 64) then
      forget(kded, kdh, redis.call('ZRANGEBYSCORE', kded, '1e12', format('%d', now)))
      forget(kded, kdh, redis.call('ZRANGEBYSCORE', kded, '-inf', t[1]))  -- the whole-second kind
    end
  end
  if ids then
    local over = redis.call('ZCARD', kded) - dmax
    if over > 0 then forget(kded, kdh, redis.call('ZRANGE', kded, 0, over - 1)) end
  end
  redis.call('EXPIRE', kpos, ttl)
  redis.call('EXPIRE', kneg, ttl)
  redis.call('EXPIRE', kseq, ttl)
  if ids then
    redis.call('EXPIRE', kded, dttl)
    redis.call('EXPIRE', kdh, dttl)
  end
end
return out
"""

# KEYS: pos, neg. Returns {n, text}: n the number of positive events, text the ZRANGE WITHSCORES elements of
# both histories (positives first) joined by newlines: member, score, member, score, ... So the client reads one
# byte string instead of 4n, and decodes it with numpy (`service.history_columns.decode_user_history`). Members
# never hold a raw newline (compact JSON payloads); the scores are the exact text Redis formats them in (%.17g),
# so timestamps round-trip bit for bit. table.concat is one C call; the append loop is the only per-event Lua.
READ_SCRIPT = """
local pos = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local neg = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
local n = #pos
for i = 1, #neg do pos[n + i] = neg[i] end
return {n / 2, table.concat(pos, '\\n')}
"""
