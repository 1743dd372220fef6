"""The local pacer, on a fake clock: evenly spaced, no bursts after idle or stalls, AIMD."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from tests.conftest import max_in_window
from worker.pacing import margin
from worker.pacing.budget import SLACK_S
from worker.pacing.local import LocalPacer
from worker.settings import Pacing


class FakeClock:
    """Time moves only when someone sleeps; `late` makes the next wake-up overshoot."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.late = 0.0

    def __call__(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        # What is ready runs first, at the time the sleep began (as on a real loop: a timer
        # fires only after the callbacks already due); then the time passes.
        await asyncio.sleep(0)
        self.t += seconds + self.late
        self.late = 0.0
        await asyncio.sleep(0)


async def admissions(pacer: LocalPacer, clock: FakeClock, n: int, callers: int = 8) -> list[float]:
    """n admissions by `callers` concurrent callers; their clock times, sorted."""
    times: list[float] = []

    async def caller(count: int) -> None:
        for _ in range(count):
            await pacer.acquire()
            times.append(clock())

    async with asyncio.TaskGroup() as tg:
        for i in range(callers):
            tg.create_task(caller(n // callers + (1 if i < n % callers else 0)))
    return sorted(times)


def test_even_spacing_and_rate() -> None:
    """Admissions are 1/target apart: never more than `rate` in a second, >= 95% of it."""
    clock = FakeClock()
    pacer = LocalPacer(Pacing(rate=10), clock=clock, sleep=clock.sleep)
    times = asyncio.run(admissions(pacer, clock, 200))
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 1 / Pacing(rate=10).target - SLACK_S
    assert max_in_window(times) <= 10
    achieved = (len(times) - 1) / (times[-1] - times[0])
    assert achieved >= 0.95 * 10


def test_no_burst_after_idle() -> None:
    """After a long idle period the next callers still go one gap apart."""
    clock = FakeClock()
    pacer = LocalPacer(Pacing(rate=10), clock=clock, sleep=clock.sleep)

    async def scenario() -> list[float]:
        await admissions(pacer, clock, 10)
        clock.t += 120.0
        return await admissions(pacer, clock, 20)

    later = asyncio.run(scenario())
    assert max_in_window(later) <= 10
    assert min(b - a for a, b in itertools.pairwise(later)) >= 1 / Pacing(rate=10).target - SLACK_S


def test_stall_does_not_release_a_clump() -> None:
    """A wake-up 0.7 s late (a stalled loop) re-anchors the schedule instead of catching up."""
    clock = FakeClock()
    pacer = LocalPacer(Pacing(rate=10), clock=clock, sleep=clock.sleep)

    async def scenario() -> list[float]:
        before = await admissions(pacer, clock, 15)
        clock.late = 0.7
        return before + await admissions(pacer, clock, 30)

    times = asyncio.run(scenario())
    assert max_in_window(times) <= 10
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 1 / Pacing(rate=10).target - SLACK_S


def test_small_lateness_keeps_the_schedule() -> None:
    """Timer slack below SLACK_S does not lower the achieved rate."""
    clock = FakeClock()
    pacer = LocalPacer(Pacing(rate=50), clock=clock, sleep=clock.sleep)

    async def sleepy(seconds: float) -> None:
        clock.t += seconds + 0.001  # every wake-up 1 ms late
        await asyncio.sleep(0)

    pacer._sleep = sleepy
    times = asyncio.run(admissions(pacer, clock, 300))
    achieved = (len(times) - 1) / (times[-1] - times[0])
    assert achieved >= 0.95 * 50
    assert max_in_window(times) <= 50


def test_a_lone_throttle_pauses_for_retry_after_and_keeps_the_rate() -> None:
    """A lone FlowLimitExceeded pauses everyone for its Retry-After and widens the margin
    back to where it started; the rate is not halved (it costs one window, not ten)."""
    clock = FakeClock()
    pacing = Pacing(rate=10, cooldown_s=1.0, recover_s=10.0)
    pacer = LocalPacer(pacing, clock=clock, sleep=clock.sleep)

    async def scenario() -> tuple[float, list[float]]:
        await admissions(pacer, clock, 120)  # 12 calm seconds: the margin narrowed
        assert pacer.margin.headroom < pacing.headroom
        t0 = clock()
        pacer.throttled(2.0)
        pacer.throttled(2.0)  # the same burst of answers: counted once
        assert pacer.throttles == 1
        assert pacer.margin.headroom == pacing.headroom
        assert pacer.rate(t0) == pacing.target
        return t0, await admissions(pacer, clock, 1)

    t0, after = asyncio.run(scenario())
    assert after[0] >= t0 + 2.0
    assert pacer.rate(t0 + 2.0) == pacer.target()


def test_repeated_throttles_halve_and_recover() -> None:
    """A second FlowLimitExceeded soon after the first backs off hard: pause, the rate
    halves, then climbs back to the target over recover_s."""
    clock = FakeClock()
    pacing = Pacing(rate=10, cooldown_s=1.0, recover_s=10.0)
    pacer = LocalPacer(pacing, clock=clock, sleep=clock.sleep)

    async def scenario() -> tuple[float, list[float]]:
        await admissions(pacer, clock, 5)
        pacer.throttled()
        await admissions(pacer, clock, 5)
        t0 = clock()
        pacer.throttled()
        assert pacer.rate(t0) == pytest.approx(pacer.target() / 2)
        return t0, await admissions(pacer, clock, 1)

    t0, after = asyncio.run(scenario())
    assert after[0] >= t0 + 1.0
    assert pacer.rate(t0 + 1.0 + 5.0) < pacer.target()
    assert pacer.rate(t0 + 1.0 + 10.0) == pacer.target()
    assert "LocalPacer" in repr(pacer) and "admitted=11" in repr(pacer)


def test_stats_count_admissions() -> None:
    """stats() and repr count what the pacer admitted, for the run's closing log line, and
    say where the margin ended and how often it widened."""
    clock = FakeClock()
    pacer = LocalPacer(Pacing(rate=10), clock=clock, sleep=clock.sleep)
    asyncio.run(admissions(pacer, clock, 7, callers=3))
    assert pacer.stats() == {"admitted": 7, "headroom": 0.03, "widened": 0, "throttles": 0}
    assert "admitted=7" in repr(pacer)


def test_the_margin_narrows_while_calm_and_widens_on_jitter() -> None:
    """On a punctual clock the margin narrows to MIN_HEADROOM; wake-ups 15 ms late widen it
    at once past the 3 % it started at, and the window still holds at most the limit."""
    clock = FakeClock()
    pacer = LocalPacer(Pacing(rate=10), clock=clock, sleep=clock.sleep)

    async def jittery(seconds: float) -> None:
        clock.t += seconds + (0.015 if pacer.admitted % 3 == 0 else 0.0)
        await asyncio.sleep(0)

    async def scenario() -> tuple[list[float], list[float]]:
        calm = await admissions(pacer, clock, 150)
        assert pacer.margin.headroom == margin.MIN_HEADROOM
        pacer._sleep = jittery
        return calm, await admissions(pacer, clock, 30)

    widened = pacer.margin.widened
    calm, times = asyncio.run(scenario())
    assert (len(calm) - 1) / (calm[-1] - calm[0]) >= 0.98 * 10
    assert pacer.margin.widened > widened
    assert pacer.margin.headroom > 0.03
    assert max_in_window(calm + times) <= 10


def test_an_explicit_margin_does_not_move() -> None:
    """Pacing(adapt=False) keeps the headroom fixed, as before issue 20."""
    clock = FakeClock()
    pacer = LocalPacer(Pacing(rate=10, adapt=False), clock=clock, sleep=clock.sleep)
    asyncio.run(admissions(pacer, clock, 150))
    pacer.throttled()
    assert pacer.margin.headroom == 0.03 and pacer.margin.widened == 0


def test_a_high_rate_does_not_sleep_for_every_admission() -> None:
    """At 5000/s, callers behind the schedule by less than SLACK_S go at once instead of one
    timer each, and any sliding second still holds at most the limit."""
    clock = FakeClock()
    pacer = LocalPacer(Pacing(rate=5000), clock=clock, sleep=clock.sleep)
    sleeps = 0

    async def late(seconds: float) -> None:
        nonlocal sleeps
        sleeps += 1
        clock.t += seconds + 0.001  # every wake-up 1 ms late: five gaps
        await asyncio.sleep(0)

    pacer._sleep = late
    times = asyncio.run(admissions(pacer, clock, 6000))
    assert sleeps < len(times) / 3
    assert max_in_window(times) <= 5000
    assert (len(times) - 1) / (times[-1] - times[0]) >= 0.95 * 5000


def test_below_250_per_second_no_two_callers_go_at_once() -> None:
    """Where the gap is longer than SLACK_S, every admission is its own instant."""
    clock = FakeClock()
    pacer = LocalPacer(Pacing(rate=200), clock=clock, sleep=clock.sleep)
    clock.late = 0.05
    times = asyncio.run(admissions(pacer, clock, 400))
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 1 / Pacing(rate=200).target - SLACK_S - 1e-9  # float times near 1000
    assert max_in_window(times) <= 200


def test_a_caller_late_for_its_slot_is_idle_time_not_jitter() -> None:
    """A listing's next page is asked for only once the first is read: it comes after its
    slot without waiting. That lateness is the pacer's idle time: the margin stays narrow
    (counted as jitter it widened a listing's margin to 9 % for the whole listing)."""
    clock = FakeClock()
    pacer = LocalPacer(Pacing(rate=10), clock=clock, sleep=clock.sleep)

    async def scenario() -> None:
        await admissions(pacer, clock, 150)
        assert pacer.margin.headroom == margin.MIN_HEADROOM
        for lateness in (0.048, 0.2, 0.013, 0.09):  # answers that took this long past a gap
            await asyncio.sleep(0)
            clock.t = pacer._next + lateness
            await pacer.acquire()
            await asyncio.sleep(0)

    asyncio.run(scenario())
    assert pacer.margin.headroom == margin.MIN_HEADROOM and pacer.admitted == 154


def test_a_loop_held_after_an_admission_widens_the_margin() -> None:
    """Nobody sleeps (every caller comes after its slot), but the loop is held 20 ms after
    some admissions before the admitted send can go: that is jitter, measured at the loop's
    next turn, and the margin widens at once to cover it."""
    clock = FakeClock()
    pacer = LocalPacer(Pacing(rate=10), clock=clock, sleep=clock.sleep)

    async def scenario() -> None:
        await admissions(pacer, clock, 150)
        widened = pacer.margin.widened
        for i in range(6):
            await asyncio.sleep(0)
            clock.t = pacer._next + 0.005
            await pacer.acquire()
            if i % 2:
                clock.t += 0.020  # work done before the loop turns: the send waits for it
            await asyncio.sleep(0)
        assert pacer.margin.widened > widened

    asyncio.run(scenario())
    assert margin.seconds(pacer.margin.headroom) >= 2 * 0.020
