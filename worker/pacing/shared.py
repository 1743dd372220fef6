"""Pace step, shared: one rate budget per account for every process that uses the same Redis.

A reservation-style GCRA in one Lua script. Redis holds the account's "theoretical arrival
time" (TAT): the next free slot. A caller atomically books the slot `max(TAT, now)` and moves
TAT one emission interval (1/target) on; the script returns how long the caller must wait
for its slot, and the caller sleeps exactly that long. Every "now" is the **Redis server's
clock** (`TIME`), never a host's, so hosts whose clocks differ by seconds still share slots
evenly; the only local time involved is a relative sleep.

A slot is slept to through the best recent reading of Redis's clock, not through the call that
booked it. Each call brackets the moment Redis read its clock between two local times (just
before it went out, just after its answer was read); the narrowest bracket of the last second
places Redis's clock in local time to within that call's round trip. On a busy machine one call
can take 100 ms (the process waited for a CPU): timed by its own bracket, its slot was slept
past by that much and then reported late, and the report pushed every process's schedule
(measured, two CPU hogs on 2 cores, `python -m bench.shared`: 6 processes at 0.77 of the limit,
reported lateness 5.7 s in total; timed by the best bracket, 0.96-0.97, 0.1 s).

A late send moves the shared schedule, as it moves the local one. A caller that wakes more
than SLACK_S after its slot still uses it (up to LATE_S) and reports when it really went:
the process's next booking carries the report, and the script pushes TAT so that the slots
booked from then on keep whole gaps from the late send (it numbers its bookings, so a run
of late slots pushes once, not once per slot). Without this a slot used 10 ms late sits
10 ms closer to the slot one second after it, and the budget needed 6 % headroom to absorb
that; with it the shared budget keeps the local pacer's 3 %.

Booking is limited to HORIZON_S ahead (a caller whose slot would lie further out books
nothing and asks again later), and each process has one Redis call in flight at a time (its
callers queue on a local lock, so a process polls once, not once per caller). The short
horizon is what lets a report arrive before the slots one second after the late one are
handed out; it also bounds the damage if Redis loses its state (a restart: it keeps nothing
on disk) — after any Redis failure a process waits one horizon before booking again, so its
new slots cannot collide with slots booked before the failure.

A FlowLimitExceeded seen by any process starts a shared pause in Redis (its Retry-After, else
the cool-down): every process waits; one more within cool-down + recover_s halves the shared
rate, which climbs back (the same rules as the local pacer).

If Redis cannot be reached the pacer does not fall back to a private budget: it stops
admitting, says so, polls until Redis answers, and gives up with LimiterUnavailable once it
has been away longer than `timeout_s`.

The Redis side (key names, the two Lua scripts) is redis_scripts.py; reading Redis's clock in
local time is redis_clock.py; this module is the process side: booking, sleeping, reporting.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, AuthorizationError, RedisError, ResponseError

from worker.errors import LimiterRefused, LimiterUnavailable
from worker.pacing import margin
from worker.pacing.budget import MIN_RATE, SLACK_S
from worker.pacing.redis_clock import MARKS, Mark, best_mark
from worker.pacing.redis_scripts import ACQUIRE, KEY_TTL_MS, THROTTLE, budget_key
from worker.settings import Pacing
from worker.urls import redact_url

log = structlog.get_logger("worker")
# Slots are booked at most this far ahead. Short, so that a late send's report reaches Redis
# before the slots a second later are booked; long enough that every process holds a slot.
HORIZON_S = 0.25
# Where the margin starts, as for one process (settings.DEFAULT_HEADROOM): late sends are
# reported and move the schedule, so the shared budget no longer pays for other processes'
# jitter. Each process then narrows or widens it from the lateness of its own slots (its
# sleeps, its reading of Redis's clock, its loop's holds), as margin.py says.
SHARED_HEADROOM = 0.03
# Woken this much after our slot: the slot is lost, not used late. A send this late is
# covered by the headroom even when its report never comes (the process had nothing more to
# send); later than this, the slots around it belong to others.
LATE_S = 0.200
# The watchdog looks at the event loop every WATCH_S. A look STALL_S late means the loop was
# held (a long step, or the OS ran something else), and a request admitted just before may
# have reached the socket only now: the admission alone cannot tell. Shorter holds are left
# to the headroom, as timer slack is (reporting them cost ~3 % of the rate, measured).
WATCH_S = 0.005
STALL_S = 0.010


class RedisPacer:
    """The shared budget of one access key in one region. Open it with `async with`.

    `stats()` says where the time went: slots used; used late and reported (of those, reported
    by the watchdog; their lateness in total); lost to a stalled loop; bookings refused because
    the horizon was full; Redis calls and their mean round trip.
    """

    def __init__(
        self,
        url: str,
        *,
        pacing: Pacing,
        access_key: str,
        region: str,
        timeout_s: float,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        watch_s: float | None = WATCH_S,
    ) -> None:
        self._url = url
        self._watch_s = watch_s
        self._pacing = replace(pacing, headroom=max(pacing.headroom, SHARED_HEADROOM))
        start = self._pacing.headroom
        self.margin = (margin.adaptive if pacing.adapt else margin.fixed)(start)
        self._timeout_s = timeout_s
        self._sleep = sleep
        self._clock = clock
        prefix = budget_key(access_key, region)
        self._keys = (f"{prefix}:tat", f"{prefix}:throttle", f"{prefix}:seq")
        self._client: aioredis.Redis | None = None
        self._acquire: Any = None
        self._throttle: Any = None
        self._down_since: float | None = None
        self._lock: asyncio.Lock | None = None  # made inside the running loop
        self._marks: deque[Mark] = deque(maxlen=MARKS)  # readings of Redis's clock
        self._late: list[tuple[int, int]] = []  # (used at, seq) on Redis's clock, not yet told
        self._tasks: set[asyncio.Task[None]] = set()  # messages to Redis still on their way
        self._flush: asyncio.Task[None] | None = None  # the one telling of late sends
        # Admitted since the watchdog last looked: (local time, slot us, seq, local due).
        self._recent: list[tuple[float, int, int, float]] = []
        self.admitted = 0  # slots used
        self.reported = 0  # of those, used late and reported
        self.stalled = 0  # of those, reported by the watchdog (the loop was held after admission)
        self._late_s = 0.0  # the lateness reported, in total
        self.missed = 0  # slots let go: the loop woke too late for them
        self.refused = 0  # bookings refused: the horizon was full, asked again later
        self.calls = 0  # Redis round trips that answered
        self._call_s = 0.0

    def __repr__(self) -> str:
        state = "down" if self._down_since is not None else "up"
        return (
            f"<RedisPacer {self._keys[0]} target={self._target():.2f}/s redis={state} "
            f"admitted={self.admitted} reported={self.reported} missed={self.missed}>"
        )

    def stats(self) -> dict[str, float]:
        """Counters for a log line at the end of a run."""
        return {
            "admitted": self.admitted,
            "reported_late": self.reported,
            "missed": self.missed,
            "stalled": self.stalled,
            "late_ms": round(1000 * self._late_s, 1),
            "refused": self.refused,
            "redis_calls": self.calls,
            "redis_rtt_ms": round(1000 * self._call_s / self.calls, 3) if self.calls else 0.0,
            "headroom": round(self.margin.headroom, 4),
            "widened": self.margin.widened,
        }

    def _target(self) -> float:
        """The limit less this process's margin in force: what its bookings space slots by."""
        return self._pacing.rate * (1 - self.margin.headroom)

    async def __aenter__(self) -> RedisPacer:
        self._client = aioredis.Redis.from_url(
            self._url,
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
            retry=Retry(NoBackoff(), 0),  # we decide how to wait for Redis, not the client
        )
        self._acquire = self._client.register_script(ACQUIRE)
        self._throttle = self._client.register_script(THROTTLE)
        client = self._client
        try:
            await client.ping()
        except (ResponseError, AuthenticationError, AuthorizationError) as exc:
            # Redis answered and said no: waiting will not change that (exit 2).
            raise LimiterRefused(
                f"--limiter {redact_url(self._url)}: Redis refused it ({exc}); check the "
                "database number and the credentials in the URL. Nothing was sent"
            ) from None
        except (RedisError, OSError):
            await self._call(lambda: client.ping())  # unreachable at the start: wait or give up
        if self._watch_s is not None:
            _ = self._own(self._watch(self._watch_s))
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        # A message still being told to Redis must not outlive the client it uses.
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        log.info("limiter.stats", **self.stats())

    async def acquire(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        while True:
            # One booking in flight per process: its callers queue here (FIFO), so a full
            # horizon is polled by one caller, and the late reports ride along with it.
            async with self._lock:
                slot_us, seq = await self._book()
                # The slot in local time, read through the best recent reading of Redis's
                # clock, not this call's: a call that was slow to answer (a busy machine)
                # would make us sleep past the slot by its round trip and then count that
                # round trip as lateness, which pushes everybody's schedule.
                earliest, due = best_mark(self._marks, self._clock()).local(slot_us)
            # Sleep to the later bound, so that we are never early; count lateness from the
            # earlier one, so that a loop that stalled is seen as late, not taken as on time.
            if (rest := due - self._clock()) > 0:
                await self._sleep(rest)
            now = self._clock()
            late = now - earliest
            if late > LATE_S:
                # Our loop stalled far past the slot: the report might come after the slots a
                # second later were booked. Let it go, book anew.
                self.missed += 1
                continue
            self.margin = margin.observe(self.margin, max(0.0, late), now)
            if late > SLACK_S:
                self._used_late(slot_us, seq, late)
            if self._watch_s is not None:
                self._recent.append((self._clock(), slot_us, seq, earliest))
            self.admitted += 1
            return

    def _used_late(self, slot_us: int, seq: int, late: float) -> None:
        """Tell the schedule now, so that the slots booked next keep whole gaps from this send.
        The next booking of this process carries the report if it goes first; otherwise one
        message of its own does, right away."""
        self._late.append((slot_us + round(late * 1e6), seq))
        self.reported += 1
        self._late_s += late
        if self._flush is None:
            self._flush = self._own(self._report())

    async def _watch(self, every_s: float) -> None:
        """Report as late what was admitted just before the loop was held."""
        last = self._clock()
        while True:
            await self._sleep(every_s)
            now = self._clock()
            if now - last - every_s > STALL_S:
                for _, slot_us, seq, due in self._recent:
                    if now - due > SLACK_S:
                        self.margin = margin.observe(self.margin, min(LATE_S, now - due), now)
                        self.stalled += 1
                        self._used_late(slot_us, seq, now - due)
            # Keep one more look's worth: a request admitted just before this look may still be
            # on its way to the socket when the next stall begins.
            self._recent = [r for r in self._recent if r[0] >= last]
            last = now

    async def _report(self) -> None:
        """Tell Redis of the late sends not yet carried by a booking."""
        try:
            while self._late:
                reports, self._late = self._late, []
                await self._script(self._args(reports, book=False))
        except LimiterUnavailable:
            pass  # acquire() meets the same outage and ends the run
        finally:
            self._flush = None

    def _args(self, reports: list[tuple[int, int]], *, book: bool) -> list[int | str]:
        p = self._pacing
        args: list[int | str] = [
            repr(self._target()),
            int(HORIZON_S * 1e6),
            int(p.cooldown_s * 1e6),
            int(p.recover_s * 1e6),
            KEY_TTL_MS,
            int(SLACK_S * 1e6),
            int(book),
        ]
        for used, number in reports:
            args += [used, number]
        return args

    def _own(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A message to Redis the caller does not wait for, owned so that __aexit__ ends it."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _book(self) -> tuple[int, int]:
        """Book the next slot: (its time on Redis's clock, its number)."""
        while True:
            reports, self._late = self._late, []
            wait_us, booked, slot_us, seq = await self._script(self._args(reports, book=True))
            if booked:
                return int(slot_us), int(seq)
            self.refused += 1
            await self._sleep(min(wait_us / 1e6, HORIZON_S / 4))

    async def _script(self, args: list[int | str]) -> tuple[int, int, int, int]:
        """Run the booking script; keep its reading of Redis's clock."""

        async def run() -> tuple[int, int, int, int]:
            asked = self._clock()
            wait_us, booked, slot_us, seq, now_us = await self._acquire(
                keys=list(self._keys), args=args
            )
            mark = Mark(asked, self._clock(), int(now_us))
            if self._marks and not best_mark(self._marks, mark.answered).agrees(mark):
                self._marks.clear()  # a clock stepped: what we read before no longer holds
            self._marks.append(mark)
            return int(wait_us), int(booked), int(slot_us), int(seq)

        result: tuple[int, int, int, int] = await self._call(run)
        return result

    def throttled(self, retry_after_s: float | None = None) -> None:
        """Start the shared pause (hard back-off if it is not the first in a while); the
        runner does not wait for Redis to hear of it. This process's margin widens now."""
        p = self._pacing
        self.margin = margin.throttled(self.margin)
        pause_s = p.cooldown_s if retry_after_s is None else retry_after_s
        args = [
            repr(self._target()),
            int(p.cooldown_s * 1e6),
            int(p.recover_s * 1e6),
            repr(MIN_RATE),
            KEY_TTL_MS,
            int(pause_s * 1e6),
        ]
        _ = self._own(self._tell_throttled(args))  # owned: __aexit__ ends it if still going

    async def _tell_throttled(self, args: list[Any]) -> None:
        try:
            await self._call(lambda: self._throttle(keys=[self._keys[1]], args=args))
        except LimiterUnavailable:
            pass  # acquire() meets the same outage and ends the run; this message is moot

    async def _call(self, op: Callable[[], Awaitable[Any]]) -> Any:
        """Run one Redis operation; while Redis is away, poll it, and give up after timeout_s."""
        delay = 0.1
        while True:
            started = self._clock()
            try:
                result = await op()
            except (RedisError, OSError) as exc:
                now = self._clock()
                self._late.clear()  # Redis may have lost the slots they refer to
                if self._down_since is None:
                    self._down_since = now
                    log.error(
                        "limiter.unreachable",
                        url=redact_url(self._url),
                        error=str(exc),
                        action="not sending until the shared limiter answers",
                        gives_up_after_s=self._timeout_s,
                    )
                if now - self._down_since > self._timeout_s:
                    raise LimiterUnavailable(
                        f"the shared limiter at {redact_url(self._url)} has been unreachable for "
                        f"more than {self._timeout_s:g}s ({exc})"
                    ) from None
                await self._sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            self.calls += 1
            self._call_s += self._clock() - started
            if self._down_since is not None:
                log.warning(
                    "limiter.back",
                    url=redact_url(self._url),
                    away_s=round(self._clock() - self._down_since, 1),
                )
                self._down_since = None
                # Slots booked before the failure may still be ahead of us, and Redis may
                # have lost them: let one horizon pass, then ask again (this answer's slot,
                # if it booked one, is stale by then and simply goes unused).
                await self._sleep(HORIZON_S)
                continue
            return result
