"""How far under the limit to pace: a margin that follows the jitter it measures (pure).

The margin, in seconds, is what a strict 1-second window forgives. At target = rate x (1 - h),
`rate` gaps of 1/target span 1 / (1 - h) seconds, so the arrivals of any `rate` + 1 sends
may bunch together by h / (1 - h) seconds in total before the server counts one too many:
30.9 ms at h = 3 %, 12.1 ms at 1.2 %, whatever the rate. What bunches them is lateness that
varies: a send late by d followed a second later by one on time is d closer to it. So the
margin must cover the *spread* of lateness over about a second (`observe` is fed how long
the loop was held: a timer that fired late, the wait for the loop's next turn after an
admission, which delays the send just admitted as much), plus what the pacer forgives on
purpose (SLACK_S), plus what the client cannot see (the way to the server, the server's
stamping): RESERVE_S.

Measured before this module (issue 20, strict window, loopback, 2 cores): the pacer holds
99.9-100 % of its target, so the fixed 3 % was the whole gap to the limit; the jitter used
was 2.5-5 ms per window, 13-17 ms at worst; a fixed 2 % was clean in 5 runs of 5, 1 % was
throttled in 2 runs of 7. Hence:

* start where it is safe, `start` (the configured headroom, 3 %);
* need = GUARD x the spread of the last two windows + SLACK_S + RESERVE_S: the spread
  counts twice, because the next second may be as bad again before it is measured;
* narrow by STEP after each window whose need fits the narrower margin, down to
  MIN_HEADROOM: 3 % to 1.2 % in 4 calm seconds (a run of 20 s keeps most of the gain);
* widen at once, within the window, to the need when it no longer fits; never past WIDEST;
* a throttle is the server saying arrivals did not fit: back to `start` at least, and the
  narrowest allowed rises by FLOOR_STEP for the rest of the run (a path that throttled at 1.2 %
  settles at 1.4 %, then 1.6 %...), so a run does not keep testing the same edge.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from worker.pacing.budget import SLACK_S

MIN_HEADROOM = 0.012  # 12.1 ms: SLACK_S + RESERVE_S + twice a 3 ms spread
WIDEST = 0.10  # 111 ms: past this the path is not jittery but broken; throttles then speak
STEP = 0.005  # narrowing per calm window: 3 % to 1.2 % in 4 calm seconds
FLOOR_STEP = 0.002  # the floor's rise per throttle
WINDOW_S = 1.0  # the server's window: lateness is judged over this span and the one before
GUARD = 2.0  # the measured spread counts twice
RESERVE_S = 0.002  # what we cannot measure: the way to the server and its stamping


def seconds(headroom: float) -> float:
    """The bunching a 1-second window forgives at this headroom."""
    return headroom / (1 - headroom)


def headroom_for(margin_s: float) -> float:
    """The headroom that forgives `margin_s` of bunching (inverse of `seconds`)."""
    return margin_s / (1 + margin_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class Margin:
    """The margin in force and what the current and the previous window measured."""

    headroom: float  # in force
    start: float  # where a run starts, and where a throttle puts it back at least
    floor: float = MIN_HEADROOM  # the narrowest allowed now (rises with each throttle)
    opened: float = float("-inf")  # when the current window began
    low: float = float("inf")  # least lateness in the current window
    high: float = float("-inf")  # most lateness in the current window
    prev_low: float = float("inf")
    prev_high: float = float("-inf")
    widened: int = 0  # times the margin widened at once (measured spread, or a throttle)

    def __post_init__(self) -> None:
        if not 0 <= self.headroom < 1 or not 0 <= self.start < 1:
            raise ValueError(f"headroom must lie in [0, 1): {self.headroom}, {self.start}")

    def need_s(self) -> float:
        """The margin the last two windows' lateness asks for (seconds)."""
        low = min(self.low, self.prev_low)
        high = max(self.high, self.prev_high)
        spread = high - low if high >= low else 0.0
        return GUARD * spread + SLACK_S + RESERVE_S


def fixed(headroom: float) -> Margin:
    """A margin that never moves: floor = start = headroom (an explicit --headroom)."""
    return Margin(headroom=headroom, start=headroom, floor=headroom)


def adaptive(start: float) -> Margin:
    """A margin that starts at `start` and may narrow to MIN_HEADROOM (never above start)."""
    return Margin(headroom=start, start=start, floor=min(start, MIN_HEADROOM))


def observe(margin: Margin, lateness_s: float, now: float) -> Margin:
    """One send `lateness_s` behind its slot, at `now`: widen at once if the spread no longer
    fits; at a window's end, narrow one STEP if the window was calm."""
    if margin.floor >= margin.start:
        return margin  # fixed
    m = margin
    if now - m.opened >= WINDOW_S:
        narrower = max(m.floor, m.headroom - STEP)
        if m.high < m.low or m.need_s() > seconds(narrower):
            narrower = m.headroom  # nothing measured, or the narrower margin would not fit
        m = replace(
            m,
            headroom=narrower,
            opened=now,
            prev_low=m.low,
            prev_high=m.high,
            low=float("inf"),
            high=float("-inf"),
        )
    m = replace(m, low=min(m.low, lateness_s), high=max(m.high, lateness_s))
    wanted = headroom_for(m.need_s())
    if wanted > m.headroom:
        m = replace(m, headroom=min(WIDEST, wanted), widened=m.widened + 1)
    return m


def throttled(margin: Margin) -> Margin:
    """The server refused one: arrivals did not fit. Back to `start` at least, and the floor
    rises one FLOOR_STEP (never above start)."""
    if margin.floor >= margin.start:
        return margin
    return replace(
        margin,
        headroom=max(margin.headroom, margin.start),
        floor=min(margin.start, margin.floor + FLOOR_STEP),
        widened=margin.widened + 1,
    )
