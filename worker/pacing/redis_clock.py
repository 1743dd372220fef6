"""Reading Redis's clock in local time: each call to Redis brackets the moment Redis read its
clock (`TIME`) between two local times, and the narrowest recent bracket places Redis's clock
to within that call's round trip. Pure: the shared pacer keeps the readings and passes `now`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Readings of Redis's clock are trusted this long (local seconds): the two clocks may drift
# apart, by ppm, and a wall clock may be slewed; a second of that is far below a slack.
MARK_S = 1.0
MARKS = 32  # the readings kept: at 20 calls/s, more than MARK_S's worth


@dataclass(frozen=True, slots=True)
class Mark:
    """One reading of Redis's clock: Redis read `redis_us` at a local time between `asked`
    (just before the call went out) and `answered` (just after its answer was read)."""

    asked: float
    answered: float
    redis_us: int

    @property
    def width(self) -> float:
        return self.answered - self.asked

    def local(self, redis_us: int) -> tuple[float, float]:
        """The local time of the Redis instant `redis_us`: the earliest and the latest it can be."""
        since = (redis_us - self.redis_us) / 1e6
        return self.asked + since, self.answered + since

    def agrees(self, other: Mark) -> bool:
        """Both can be right: the clocks did not step between them (nor drift a whole width)."""
        earliest, latest = self.local(other.redis_us)
        return earliest <= other.answered and other.asked <= latest


def best_mark(marks: Sequence[Mark], now: float) -> Mark:
    """The narrowest reading of the last MARK_S (on a tie the newest; the newest always
    counts). A call held up by a busy machine reads Redis's clock as loosely as it was slow;
    the quickest recent call pins it to within its own round trip."""
    newest = marks[-1]
    fresh = [m for m in marks if now - m.answered <= MARK_S] or [newest]
    return min(reversed(fresh), key=lambda m: m.width)
