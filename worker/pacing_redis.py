"""Pace step, shared: one rate budget per account for every process that uses the same Redis.

A reservation-style GCRA in one Lua script. Redis holds the account's "theoretical arrival
time" (TAT): the next free slot. A caller atomically books the slot `max(TAT, now)` and moves
TAT one emission interval (1/target) on; the script returns how long the caller must wait
for its slot, and the caller sleeps exactly that long. Every "now" is the **Redis server's
clock** (`TIME`), never a host's, so hosts whose clocks differ by seconds still share slots
evenly; the only local time involved is a relative sleep.

Booking is limited to `HORIZON_S` ahead: a caller whose slot would lie further out books
nothing and asks again later. That keeps the slots handed out but not yet used to one
second's worth, which is what bounds the damage if Redis loses its state (a restart: it keeps
nothing on disk) — and after any Redis failure a process waits one horizon before booking
again, so its new slots cannot collide with slots booked before the failure.

A FlowLimitExceeded seen by any process starts a shared cool-down in Redis: every process
pauses, the shared rate halves and climbs back (the same AIMD as the local pacer).

If Redis cannot be reached the pacer does not fall back to a private budget: it stops
admitting, says so, polls until Redis answers, and gives up with LimiterUnavailable once it
has been away longer than `timeout_s`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from worker.errors import LimiterUnavailable
from worker.pacing import MIN_RATE
from worker.settings import Pacing, redact_url

log = structlog.get_logger("worker")
HORIZON_S = 1.0
# Requests from several processes reach the server with more relative jitter than one
# process's (each is scheduled on its own, each has its own Redis round trip): measured,
# 3% headroom (~30 ms in a second) was sometimes not enough with three processes on two
# cores; 6% (~60 ms) keeps ~94% of the limit.
SHARED_HEADROOM = 0.06
LATE_S = 0.010  # woken this much after our slot: the slot is lost, not used late
KEY_TTL_MS = 120_000  # keys vanish on their own once nobody uses the budget

# KEYS: tat, throttle (hash: at, floor). ARGV: target rate, horizon us, cooldown us, recover us,
# ttl ms. Returns {wait_us, booked (1|0)}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local target = tonumber(ARGV[1])
local horizon, cooldown, recover = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local rate = target
local earliest = now
local th = redis.call('HMGET', KEYS[2], 'at', 'floor')
if th[1] then
  local at, floor = tonumber(th[1]), tonumber(th[2])
  earliest = math.max(earliest, at + cooldown)
  local share = math.min(1, math.max(0, (now - at - cooldown) / recover))
  rate = floor + (target - floor) * share
end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local slot = math.max(tat, earliest)
if slot - now > horizon then
  return {slot - now - horizon, 0}
end
redis.call('SET', KEYS[1], string.format('%.0f', slot + math.floor(1000000 / rate)), 'PX', ARGV[5])
return {slot - now, 1}
"""

# KEYS: throttle. ARGV: target rate, cooldown us, recover us, min rate, ttl ms.
_THROTTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local target, cooldown, recover = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local rate = target
local th = redis.call('HMGET', KEYS[1], 'at', 'floor')
if th[1] then
  local at, floor = tonumber(th[1]), tonumber(th[2])
  if now - at < cooldown then return 0 end
  local share = math.min(1, math.max(0, (now - at - cooldown) / recover))
  rate = floor + (target - floor) * share
end
-- %.0f: Lua 5.1's tostring keeps 14 digits, and microsecond stamps have 16
local floor = math.max(tonumber(ARGV[4]), rate / 2)
redis.call('HSET', KEYS[1], 'at', string.format('%.0f', now), 'floor', tostring(floor))
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""


class RedisPacer:
    """The shared budget of one access key at one endpoint. Open it with `async with`."""

    def __init__(self, url: str, *, pacing: Pacing, endpoint: str, access_key: str,
                 timeout_s: float,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._url = url
        self._pacing = replace(pacing, headroom=max(pacing.headroom, SHARED_HEADROOM))
        self._timeout_s = timeout_s
        self._sleep = sleep
        self._clock = clock
        # Namespaced by endpoint and AK (hashed: keys show up in MONITOR and dashboards).
        ident = hashlib.sha256(f"{endpoint}|{access_key}".encode()).hexdigest()[:16]
        self._keys = (f"worker:pace:{ident}:tat", f"worker:pace:{ident}:throttle")
        self._client: aioredis.Redis | None = None
        self._acquire: Any = None
        self._throttle: Any = None
        self._down_since: float | None = None
        self.admitted = 0
        self.missed = 0

    def __repr__(self) -> str:
        state = "down" if self._down_since is not None else "up"
        return f"<RedisPacer {self._keys[0]} target={self._pacing.target:.2f}/s redis={state}>"

    async def __aenter__(self) -> RedisPacer:
        self._client = aioredis.Redis.from_url(
            self._url, socket_timeout=2.0, socket_connect_timeout=2.0,
            retry=Retry(NoBackoff(), 0),  # we decide how to wait for Redis, not the client
        )
        self._acquire = self._client.register_script(_ACQUIRE)
        self._throttle = self._client.register_script(_THROTTLE)
        client = self._client
        await self._call(lambda: client.ping())  # unreachable at the start: wait or give up
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def acquire(self) -> None:
        p = self._pacing
        args = [repr(p.target), int(HORIZON_S * 1e6), int(p.cooldown_s * 1e6),
                int(p.recover_s * 1e6), KEY_TTL_MS]
        while True:
            wait_us, booked = await self._call(
                lambda: self._acquire(keys=list(self._keys), args=args))
            if not booked:
                await self._sleep(min(wait_us / 1e6, HORIZON_S / 4))
                continue
            due = self._clock() + wait_us / 1e6
            if wait_us > 0:
                await self._sleep(wait_us / 1e6)
            if self._clock() - due > LATE_S:
                # Our loop stalled past the slot. The next slots belong to others (other
                # processes too): sending now would bunch up with theirs. Let it go, book anew.
                self.missed += 1
                continue
            self.admitted += 1
            return

    def throttled(self) -> None:
        """Start the shared cool-down; the runner does not wait for Redis to hear of it."""
        p = self._pacing
        args = [repr(p.target), int(p.cooldown_s * 1e6), int(p.recover_s * 1e6), repr(MIN_RATE),
                KEY_TTL_MS]
        task = asyncio.ensure_future(self._call(
            lambda: self._throttle(keys=[self._keys[1]], args=args)))
        task.add_done_callback(_ignore_failure)

    async def _call(self, op: Callable[[], Any]) -> Any:
        """Run one Redis operation; while Redis is away, poll it, and give up after timeout_s."""
        delay = 0.1
        while True:
            try:
                result = await op()
            except (RedisError, OSError) as exc:
                now = self._clock()
                if self._down_since is None:
                    self._down_since = now
                    log.error("limiter.unreachable", url=redact_url(self._url), error=str(exc),
                              action="not sending until the shared limiter answers",
                              gives_up_after_s=self._timeout_s)
                if now - self._down_since > self._timeout_s:
                    raise LimiterUnavailable(
                        f"the shared limiter at {redact_url(self._url)} has been unreachable for "
                        f"more than {self._timeout_s:g}s ({exc})") from None
                await self._sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if self._down_since is not None:
                log.warning("limiter.back", url=redact_url(self._url),
                            away_s=round(self._clock() - self._down_since, 1))
                self._down_since = None
                # Slots booked before the failure may still be ahead of us, and Redis may
                # have lost them: let one horizon pass, then ask again (this answer's slot,
                # if it booked one, is stale by then and simply goes unused).
                await self._sleep(HORIZON_S)
                continue
            return result


def _ignore_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a lost cool-down message is not worth a crash
