"""Deterministic misbehaviour: which request gets which fault, as a function of
(seed, action, Name, n-th request for that action and Name), whatever the interleaving."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

from worker.api import spec
from worker.sandbox.config import AMBIGUOUS


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str  # one of config.FAULTS
    ambiguous: bool  # the request is carried out first, then the client is misled


def pick(
    *,
    seed: int,
    action: str,
    name: str | None,
    n: int,
    fault_rate: float,
    ambiguous_rate: float,
    kinds: tuple[str, ...],
) -> Fault | None:
    """The fault for the n-th (1-based) request about (action, name), or None. Only creates
    can be ambiguous: they are the requests whose retry proves what happened (`Exist`)."""
    digest = hashlib.sha256(f"{seed}|{action}|{name}|{n}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    choice = int.from_bytes(digest[8:16], "big")
    if action == spec.CREATE and u < ambiguous_rate:
        return Fault(AMBIGUOUS[choice % len(AMBIGUOUS)], ambiguous=True)
    if u < ambiguous_rate + fault_rate and kinds:
        return Fault(kinds[choice % len(kinds)], ambiguous=False)
    return None


class Faults:
    """Counts requests per (action, Name) and picks each one's fault."""

    def __init__(
        self,
        *,
        seed: int,
        fault_rate: float,
        ambiguous_rate: float,
        kinds: tuple[str, ...],
        timeout_first_create: bool = False,
    ) -> None:
        self.seed, self.fault_rate, self.ambiguous_rate = seed, fault_rate, ambiguous_rate
        self.kinds = kinds
        self.timeout_first_create = timeout_first_create
        self._seen: Counter[tuple[str, str]] = Counter()

    def next(self, action: str, name: str | None) -> Fault | None:
        if self.fault_rate == 0 and self.ambiguous_rate == 0 and not self.timeout_first_create:
            return None
        key = (action, name or "")
        self._seen[key] += 1
        if self.timeout_first_create and action == spec.CREATE and self._seen[key] == 1:
            # The create is carried out and answered 504: its retry then hears `Exist`.
            return Fault("InternalServiceTimeout", ambiguous=True)
        return pick(
            seed=self.seed,
            action=action,
            name=name,
            n=self._seen[key],
            fault_rate=self.fault_rate,
            ambiguous_rate=self.ambiguous_rate,
            kinds=self.kinds,
        )
