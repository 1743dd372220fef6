"""How many requests may be on the wire at once: rate x latency (Little's law), capped.

The in-flight limit follows latency: it is sized from a moving average of answer times, and
from the age of the oldest request still out (a request out for 3 s says the latency is at
least 3 s before its answer does), never above the cap (`--concurrency`, else DEFAULT_CAP and
what the open-file limit allows).
"""

from __future__ import annotations

import math
import resource
from typing import Final

from worker.settings import DEFAULT_CAP

MIN_IN_FLIGHT: Final = 2
START_LATENCY_S: Final = 0.5  # the latency assumed before the first answer


class Concurrency:
    """The in-flight limit: rate x latency (Little's law) with room to spare, capped."""

    _ROOM = 1.5  # in flight = rate x latency x _ROOM (+1): latency varies from one to the next

    def __init__(self, *, rate: float, cap: int, alpha: float = 0.2) -> None:
        self._rate = rate
        self.cap = cap
        self._alpha = alpha
        self.latency_s = START_LATENCY_S

    def __repr__(self) -> str:
        return f"<Concurrency limit={self.limit} latency={self.latency_s:.3f}s cap={self.cap}>"

    @property
    def limit(self) -> int:
        want = math.ceil(self._rate * self.latency_s * self._ROOM) + 1
        return max(MIN_IN_FLIGHT, min(self.cap, want))

    def observe(self, latency_s: float) -> None:
        # Rise at once (a slow server must not starve the rate), fall slowly.
        if latency_s > self.latency_s:
            self.latency_s = latency_s
        else:
            self.latency_s += self._alpha * (latency_s - self.latency_s)

    def waiting(self, age_s: float) -> None:
        """A request has been out `age_s` seconds without an answer: the latency is at least
        that. Without this, the first answers of a slow server (2-4 s) would come only after
        START_LATENCY_S worth of requests had starved the rate for seconds."""
        self.latency_s = max(self.latency_s, age_s)

    def latency_for(self, in_flight: int) -> float | None:
        """The latency above which the limit exceeds `in_flight` (None: the cap is reached,
        no latency makes room)."""
        if in_flight >= self.cap:
            return None
        return max(0.0, in_flight - 1) / (self._rate * self._ROOM)


def machine_cap(explicit: int | None) -> int:
    """--concurrency, else DEFAULT_CAP; never more than the open-file limit leaves room for."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = max(MIN_IN_FLIGHT, (soft if soft != resource.RLIM_INFINITY else 1 << 20) - 64)
    return min(explicit or DEFAULT_CAP, room)
