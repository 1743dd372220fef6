"""What a rate budget is to the runner: the `Pacer` protocol, and the two numbers every
pacer keeps (local.LocalPacer in one process, shared.RedisPacer across processes).

The runner and the composition import `Pacer` from here, so neither pacer's module is needed
to name the other, and the shared pacer does not load the local one.
"""

from __future__ import annotations

from typing import Protocol

# Lateness forgiven: a caller woken up to SLACK_S after its slot still takes it, and the
# schedule is not pushed back (local.py's docstring says why, with the measurements).
SLACK_S = 0.004
MIN_RATE = 0.2  # requests per second the cool-down never goes below


class Pacer(Protocol):
    """What the runner needs of a rate budget, local or shared."""

    async def acquire(self) -> None:
        """Return when one more request may be sent now."""

    def throttled(self, retry_after_s: float | None = None) -> None:
        """The server answered FlowLimitExceeded (with this Retry-After, if any): pause
        everybody, and back off hard if it happens again soon."""
