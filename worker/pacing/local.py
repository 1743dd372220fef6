"""Pace step: one rate budget per account, in this process.

The server enforces its limit as a strict sliding window: any 1-second span may hold at most
`rate` arrivals. A token bucket (aiolimiter's `AsyncLimiter(rate, 1)`) lets `rate` go at once
and then one per 1/rate: 2*rate-1 inside one second. So this pacer spaces admissions evenly,
1/target apart (target = rate less a small headroom), with no burst allowance at all:

* The gap is measured from when a request was actually *admitted* (the real clock after the
  sleep), not from when it was scheduled. After idle time, or after the event loop stalled
  with several callers overdue, they still go out one gap apart, never in a clump.
* Waking up a little late (timer slack, < SLACK) does not push the schedule back, or the
  achieved rate would sag by the timer's lateness on every request. Keeping the schedule
  compresses any run of N+1 admissions by at most SLACK in total, which the headroom covers:
  N gaps of 1/target span N/target = 1/(1-headroom) seconds.
* At a high rate the gap is shorter than one turn of the event loop (5000/s: 0.2 ms), so a
  caller that is behind the schedule by up to SLACK goes at once, without a sleep: a clump of
  at most SLACK x target admissions, which the same headroom covers. Sleeping for every
  admission would cost one timer and one loop turn per request (measured, bench.cpu: a
  quarter of the client's CPU at 5000/s) to space requests that a 1-second window cannot
  tell apart. Below 1 / SLACK (250/s) no two callers are ever admitted at once.

Why not aiolimiter (measured, `python -m bench.pacing --runs 3`, 300 groups, strict sandbox
at 50/s, latency 20-400 ms, the same bench client and concurrency for both): this pacer
0.966 of the limit (0.963-0.969), 0 throttles; `AsyncLimiter(1, 1/target)` with the same
cool-down gate 0.917 (0.912-0.921), 0 throttles. It is as safe, but 5 % slower, not within
1 %: it spaces each admission from the moment its timer really fired, so every wake-up's
lateness is lost, where this pacer forgives lateness up to SLACK_S. aiolimiter stays only
in the benchmark, as a contender.

How far under the limit (the headroom) is not fixed: margin.py narrows it from the
configured 3 % while the admissions' lateness stays well inside it, and widens it at once when
it does not (margin.py says how, with the measurements). What this pacer feeds it is how long
the event loop was held: how late a caller that slept to its slot woke up, and, for every
admission, how long the loop took to come round once after it (the admitted send waits that
long to go: the dispatcher reading its next item, an answer being checked). A caller that
simply came after its slot is not late in that sense: the pacer was idle (a listing asks for
page 2 only once page 1 is read), and its send is spaced from when it came. Counted as
jitter, that idle time widened a listing's margin to 9 % for all of its 100 pages (9.1 pages
a second at 10/s); counting only sleepers, where the in-flight limit sets the pace nobody
sleeps and a held loop went unmeasured (a FlowLimitExceeded in bench.latency's clean run).

A FlowLimitExceeded answer means arrivals did not fit, or someone else (another process,
another tool) spends the same budget. A lone one costs one window: everybody pauses for its
Retry-After (else `cooldown_s`), the margin goes back to where it started, and the rate stays.
One more within `recover_s` of it is no accident: the rate halves, then climbs back linearly
to the target over `recover_s` (AIMD, as TCP does). Before (issue 20): every throttle paused
1 s, halved the rate and climbed back over 10 s, about 3.8 s lost per 429, more than running
closer to the limit could ever win back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from worker.pacing import margin
from worker.pacing.budget import MIN_RATE, SLACK_S
from worker.settings import Pacing


class LocalPacer:
    """The budget of one process: admissions spaced evenly at the rate in force (a Pacer)."""

    def __init__(
        self,
        pacing: Pacing,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._pacing = pacing
        self._clock = clock
        self._sleep = sleep
        self._next = float("-inf")  # earliest admission of the next caller
        self._throttled_at: float | None = None
        self._until = float("-inf")  # the last throttle's pause ends here
        self._floor: float | None = None  # the rate right after a hard back-off, else None
        self.margin = (margin.adaptive if pacing.adapt else margin.fixed)(pacing.headroom)
        self._lock: asyncio.Lock | None = None  # made inside the running loop
        self.admitted = 0
        self.throttles = 0  # throttle events (a burst of answers is one)

    def __repr__(self) -> str:
        return (
            f"<LocalPacer target={self.target():.2f}/s headroom={self.margin.headroom:.4f} "
            f"now={self.rate(self._clock()):.2f}/s admitted={self.admitted}>"
        )

    def stats(self) -> dict[str, float]:
        """Counters for a log line at the end of a run."""
        return {
            "admitted": self.admitted,
            "headroom": round(self.margin.headroom, 4),
            "widened": self.margin.widened,
            "throttles": self.throttles,
        }

    def target(self) -> float:
        """The limit less the margin in force."""
        return self._pacing.rate * (1 - self.margin.headroom)

    def rate(self, now: float) -> float:
        """The rate in force at `now`: the target, or on the way back to it."""
        target = self.target()
        if self._floor is None:
            return target
        share = min(1.0, max(0.0, (now - self._until) / self._pacing.recover_s))
        return min(target, self._floor + (target - self._floor) * share)

    async def acquire(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        # One caller at a time holds the lock while it waits for its slot: the lock's FIFO
        # order is the admission order, and nobody can slip in between check and update.
        async with self._lock:
            slept = False
            while True:
                now = self._clock()
                due = self._next
                if now >= due:
                    break
                await self._sleep(due - now)
                slept = True
            if slept:
                # How late the timer woke us: the loop was held that long.
                self._observe(now - due, now)
            gap = 1.0 / self.rate(now)
            self._next = max(due + gap, now + gap - SLACK_S)
            self.admitted += 1
            asyncio.get_running_loop().call_soon(self._turned, now)

    def _turned(self, admitted: float) -> None:
        """The loop's next turn after an admission: how long it took to come is how long the
        loop was held while the admitted send waited to go (the dispatcher reading the next
        item, an answer being checked). Measured for every admission, sleeper or not."""
        now = self._clock()
        self._observe(now - admitted, now)

    def _observe(self, lateness_s: float, now: float) -> None:
        if 0.0 <= lateness_s < 1.0:  # a second or more is a stall: throttles speak for it
            self.margin = margin.observe(self.margin, lateness_s, now)

    def throttled(self, retry_after_s: float | None = None) -> None:
        now = self._clock()
        if self._throttled_at is not None and now < max(
            self._until, self._throttled_at + self._pacing.cooldown_s
        ):
            return  # the same burst of answers: one event, not one per answer
        repeated = (
            self._throttled_at is not None
            and now - self._throttled_at < self._pacing.cooldown_s + self._pacing.recover_s
        )
        self.margin = margin.throttled(self.margin)
        if repeated:
            self._floor = max(MIN_RATE, self.rate(now) / 2)
        pause = self._pacing.cooldown_s if retry_after_s is None else retry_after_s
        self.throttles += 1
        self._throttled_at = now
        self._until = now + pause
        self._next = max(self._next, self._until)
