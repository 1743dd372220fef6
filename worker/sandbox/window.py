"""The gateway's rate limit: a strict sliding window per access key (pure; clock injected).

Any span of `window_s` seconds may hold at most `rate` admitted arrivals. Refused arrivals
do not count, so a client that keeps knocking is not locked out for longer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable


class SlidingWindow:
    def __init__(self, *, rate: int, window_s: float, clock: Callable[[], float]) -> None:
        self.rate, self.window_s, self.clock = rate, window_s, clock
        self._arrivals: dict[str, deque[float]] = {}

    def admit(self, key: str, at: float | None = None) -> bool:
        """Admit an arrival for `key` at `at` (default: now), or refuse it. An arrival
        exactly `window_s` older than `at` has left the window."""
        now = self.clock() if at is None else at
        window = self._arrivals.setdefault(key, deque())
        while window and window[0] <= now - self.window_s:
            window.popleft()
        if len(window) >= self.rate:
            return False
        window.append(now)
        return True

    def __repr__(self) -> str:
        held = {k: len(v) for k, v in self._arrivals.items()}
        return f"SlidingWindow(rate={self.rate}, window_s={self.window_s}, held={held})"
