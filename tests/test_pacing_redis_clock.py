"""Reading Redis's clock in local time (worker.pacing.redis_clock): pure, no Redis."""

from __future__ import annotations

from worker.pacing.redis_clock import MARK_S, Mark, best_mark


def test_a_mark_places_a_redis_instant_between_its_bounds() -> None:
    """Redis read 1_000_000 us somewhere in [10.0, 10.004]: 50 ms later is [10.05, 10.054]."""
    mark = Mark(10.0, 10.004, 1_000_000)
    assert mark.local(1_050_000) == (10.05, 10.054)
    assert abs(mark.width - 0.004) < 1e-12


def test_the_narrowest_fresh_mark_wins() -> None:
    """A slow call (60 ms wide) does not loosen the reading a quick call (0.2 ms) gave."""
    quick = Mark(10.0, 10.0002, 1_000_000)
    slow = Mark(10.5, 10.56, 1_500_100)
    assert best_mark([quick, slow], now=10.6) is quick


def test_a_tie_goes_to_the_newest() -> None:
    """Equal widths: the newest reading is used (the clocks have drifted least since)."""
    old = Mark(10.0, 10.001, 1_000_000)
    new = Mark(10.5, 10.501, 1_500_000)
    assert best_mark([old, new], now=10.6) is new


def test_stale_marks_are_forgotten_but_the_newest_always_counts() -> None:
    """A reading older than MARK_S is not used however narrow; when all are stale, the newest
    still is."""
    quick = Mark(10.0, 10.0002, 1_000_000)
    slow = Mark(10.5, 10.56, 1_500_100)
    assert best_mark([quick, slow], now=10.0002 + MARK_S + 0.1) is slow
    assert best_mark([quick, slow], now=100.0) is slow


def test_marks_agree_unless_a_clock_stepped() -> None:
    """Two readings of the same clocks overlap; after Redis's clock stepped 1 s they cannot."""
    first = Mark(10.0, 10.001, 1_000_000)
    later = Mark(11.0, 11.003, 2_000_500)
    stepped = Mark(11.0, 11.003, 3_000_500)
    assert first.agrees(later) and later.agrees(first)
    assert not first.agrees(stepped)
