"""The shared budget's state in Redis: its key names and the two Lua scripts that read and
change it atomically (book a slot, start a cool-down). Every "now" in them is Redis's `TIME`.
shared.RedisPacer runs them; shared.py's docstring tells the algorithm.
"""

from __future__ import annotations

import hashlib

KEY_TTL_MS = 120_000  # keys vanish on their own once nobody uses the budget

# KEYS: tat, throttle (hash: at, until, floor), seq. ARGV: target rate, horizon us, cooldown us,
# recover us, ttl ms, slack us, book (1|0), then (used at us, seq) per late send reported.
# Returns {wait_us, booked (1|0), slot us, seq, now us}; with book 0 it only takes the reports.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local target = tonumber(ARGV[1])
local horizon, cooldown, recover = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local rate = target
local earliest = now
local th = redis.call('HMGET', KEYS[2], 'until', 'floor')
if th[1] then
  local untl = tonumber(th[1])
  earliest = math.max(earliest, untl)
  if th[2] then
    local floor = tonumber(th[2])
    local share = math.min(1, math.max(0, (now - untl) / recover))
    rate = math.min(target, floor + (target - floor) * share)
  end
end
local gap = math.floor(1000000 / rate)
local slack = math.min(tonumber(ARGV[6]), gap / 4)
local tat0 = tonumber(redis.call('GET', KEYS[1]) or '0')
local tat = tat0
local seq = tonumber(redis.call('GET', KEYS[3]) or '0')
-- A slot numbered s used at u: the n = seq - s slots booked since keep their places, the
-- next one keeps (n + 1) whole gaps from u (less the slack the local pacer forgives too).
-- A number above seq comes from before Redis lost its state: it says nothing now.
for i = 8, #ARGV - 1, 2 do
  local used, s = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  if s <= seq then
    tat = math.max(tat, used - slack + (seq - s + 1) * gap)
  end
end
local slot = math.max(tat, earliest)
if ARGV[7] == '0' or slot - now > horizon then
  if tat > tat0 then
    redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', ARGV[5])
  end
  return {slot - now - horizon, 0, 0, 0, now}
end
seq = seq + 1
-- %.0f: Lua 5.1's tostring keeps 14 digits, and microsecond stamps have 16
redis.call('SET', KEYS[1], string.format('%.0f', slot + gap), 'PX', ARGV[5])
redis.call('SET', KEYS[3], string.format('%.0f', seq), 'PX', ARGV[5])
return {slot - now, 1, slot, seq, now}
"""

# KEYS: throttle. ARGV: target rate, cooldown us, recover us, min rate, ttl ms, pause us.
# A throttle while the last one's pause (or cooldown) lasts is the same burst: ignored. One
# within cooldown + recover of the last is repeated: the rate in force halves (floor) and
# climbs back over recover. A lone one only pauses everybody until `until`.
# Returns 1 if it started a pause (2 if it also halved the rate), 0 if it was the same burst.
THROTTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local target, cooldown, recover = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local rate = target
local repeated = false
local th = redis.call('HMGET', KEYS[1], 'at', 'until', 'floor')
if th[1] then
  local at, untl = tonumber(th[1]), tonumber(th[2])
  if now < math.max(untl, at + cooldown) then return 0 end
  repeated = now - at < cooldown + recover
  if th[3] then
    local floor = tonumber(th[3])
    local share = math.min(1, math.max(0, (now - untl) / recover))
    rate = math.min(target, floor + (target - floor) * share)
  end
end
local untl = string.format('%.0f', now + tonumber(ARGV[6]))
redis.call('HSET', KEYS[1], 'at', string.format('%.0f', now), 'until', untl)
if repeated then
  redis.call('HSET', KEYS[1], 'floor', tostring(math.max(tonumber(ARGV[4]), rate / 2)))
else
  redis.call('HDEL', KEYS[1], 'floor')
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if repeated then return 2 end
return 1
"""


def budget_key(access_key: str, region: str) -> str:
    """The Redis key prefix of one access key's budget in one region.

    The budget is the server's (10 req/s per user), so the key names only what the server
    counts by: not the endpoint's spelling, which split one key into several budgets
    (`http://h:p`, `http://h:p/` and `http://localhost:p`: three workers, 16 throttles).
    Hashed: keys show up in MONITOR and dashboards, an access key id should not."""
    ident = hashlib.sha256(f"live|{region}|{access_key}".encode()).hexdigest()[:16]
    return f"worker:pace:{ident}"
