"""What a sandbox is told to be: its settings, the faults it knows, and where it listens.

No server code here, so the command line and the package's re-exports stay cheap to import.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from worker.api import spec
from worker.errors import UsageError

# Faults a request may be answered with instead of being carried out (nothing changes).
FAULTS: Final = (
    "CommonErr",
    "InternalError",
    "InternalServiceError",
    "ServiceUnavailableTemp",
    "InternalServiceTimeout",
    "drop",
    "hang",
)
# HTTP status of each fault that answers at all (drop and hang do not).
FAULT_STATUS: Final = {
    "CommonErr": 200,
    "InternalError": 500,
    "InternalServiceError": 502,
    "ServiceUnavailableTemp": 503,
    "InternalServiceTimeout": 504,
}
# Orders List may show the account in: creation order, newest first, or a new random order
# on every call (the API documents none).
LIST_ORDERS: Final = ("created", "newest", "shuffled")
# Ways the server misbehaves after it *has* created the group.
AMBIGUOUS: Final = ("InternalServiceTimeout", "drop")


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxConfig:
    host: str = "127.0.0.1"
    port: int = 0
    rate: int = spec.DOCUMENTED_RATE  # requests per sliding window per access key
    window_s: float = 1.0
    keys: dict[str, str] = field(default_factory=dict, repr=False)  # AK -> SK
    fault_rate: float = 0.0
    ambiguous_rate: float = 0.0
    faults: tuple[str, ...] = FAULTS
    latency_ms: tuple[float, float] = (0.0, 0.0)
    seed: int = 0
    log: Path | None = None
    max_skew_s: float = 900.0
    clock_offset_s: float = 0.0  # the server's clock minus the real one (clock tests)
    forbid: str | None = None  # regex; a write about a matching Name or ProjectName gets 403
    hang_s: float = 60.0
    preload: Path | None = None  # a manifest whose groups exist at start (created 0)
    list_lag_ms: float = 0.0  # List sees the account as it was this long ago
    list_churn: int = 0  # after each of the first K List pages, one new group appears
    list_order: str = "created"  # one of LIST_ORDERS
    churn_every_s: float = 0.0  # another party creates a group every S s, deletes one S/2 later
    timeout_first_create: bool = False  # each Name's first create: carried out, answered 504
    state_file: Path | None = None  # the account (and keys) kept between runs

    def __post_init__(self) -> None:
        if self.rate < 1:
            raise UsageError("sandbox rate must be at least 1")
        if not 0 <= self.fault_rate + self.ambiguous_rate <= 1:
            raise UsageError("--fault-rate + --ambiguous-rate must lie in [0, 1]")
        if unknown := set(self.faults) - set(FAULTS):
            raise UsageError(f"--faults: unknown kinds {sorted(unknown)}; known: {FAULTS}")
        lo, hi = self.latency_ms
        if not 0 <= lo <= hi:
            raise UsageError("--latency-ms must be A-B with 0 <= A <= B")
        if not (math.isfinite(self.list_lag_ms) and self.list_lag_ms >= 0):
            raise UsageError("--list-lag-ms must be a finite number >= 0")
        if self.list_churn < 0:
            raise UsageError("--list-churn must be >= 0")
        if self.list_order not in LIST_ORDERS:
            raise UsageError(f"--list-order must be one of {', '.join(LIST_ORDERS)}")
        if not (math.isfinite(self.churn_every_s) and self.churn_every_s >= 0):
            raise UsageError("--churn-every must be a finite number of seconds >= 0")


def new_keys() -> dict[str, str]:
    """A throwaway access key pair for a sandbox nobody configured."""
    return {"AKSANDBOX" + secrets.token_hex(6).upper(): secrets.token_urlsafe(24)}
