"""Live counts of one run: what the progress line, the footer and the metrics show."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from worker.ledger.records import Action, Outcome


@dataclass(slots=True)
class Tally:
    """Live counts of one run: outcomes per action, skips, answer codes, requests."""

    to_send: int = 0
    outcomes: Counter[tuple[Action | None, Outcome]] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    planned: Counter[str] = field(default_factory=Counter)  # every plan decision, by reason
    codes: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    throttles: int = 0
    retries: int = 0
    started: float = field(default_factory=time.monotonic)
    first_send: float | None = None
    last_send: float | None = None

    @property
    def finished(self) -> int:
        """Items with a result in this run (conflicts and invalid lines included)."""
        return sum(self.outcomes.values())

    @property
    def rate(self) -> float:
        """Requests per second between the first and the last send: what the pacer achieved
        (a run's start-up and its last answer's latency are not part of it)."""
        if self.first_send is None or self.last_send is None or self.requests < 2:
            return 0.0
        span = self.last_send - self.first_send
        return (self.requests - 1) / span if span > 0 else 0.0

    def rate_at(self, now: float) -> float | None:
        """Requests per second from the first send to `now` (not to the last send: a stall
        brings it down as it happens). `now` is never before the last send, so this is at
        most `rate`: at most what the pacer admits. None before two requests."""
        if self.first_send is None or self.requests < 2 or now <= self.first_send:
            return None
        return (self.requests - 1) / (now - self.first_send)

    def count(self, outcome: Outcome) -> int:
        return sum(n for (_, o), n in self.outcomes.items() if o is outcome)

    def by_key(self) -> dict[str, int]:
        """ "action/outcome" -> count, as the footer and the metrics name them."""
        return {
            f"{a or 'none'}/{o}": n
            for (a, o), n in sorted(
                self.outcomes.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))
            )
        }
