"""Settings: frozen values built once by the CLI and passed down explicitly.

Every number a user can give is checked here, once, against the range in LIMITS (finite, in
range, the right kind): a UsageError names the flag, the range and the value. URLs are
checked when Settings are built (urls.py: `check_endpoint`, `check_limiter`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

from worker.api import spec
from worker.errors import UsageError
from worker.urls import check_endpoint, check_limiter, redact_url

# Pace a little under the limit. The server stamps arrivals, not our sends: a few ms of
# jitter between the two must not push an 11th request into someone's sliding second.
DEFAULT_HEADROOM = 0.03
# Without --concurrency the runner adapts the requests in flight to the latency it measures,
# up to this cap (runner/concurrency.machine_cap also keeps it under the open-file limit).
DEFAULT_CAP: Final = 512

N = TypeVar("N", int, float)
MIN_RATE_FLAG: Final = 0.2  # the lowest --rate: see LIMITS


@dataclass(frozen=True, slots=True, kw_only=True)
class Limit:
    """The documented range of one numeric option."""

    flag: str
    low: float
    high: float
    low_open: bool = False  # (low, ...: low itself is refused
    high_open: bool = False  # ..., high): high itself is refused
    whole: bool = False  # an int is required

    def __str__(self) -> str:
        low = f"{self.low:g}" if not self.whole else str(int(self.low))
        high = f"{self.high:g}" if not self.whole else str(int(self.high))
        if self.whole:
            return f"{low}..{high}"
        return f"{'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"

    def check(self, value: N, named: str = "") -> N:
        """`value` when it is a finite number in range, else a UsageError naming where the
        value came from (`named`: `--rate`, `WORKER_RATE`, `job.toml:3: rate`; else the flag).

        Refused: bool (a TOML `true` is not a number), NaN, infinities, -0.0 (a sign a
        setting cannot have), floats where a whole number is needed, huge ints out of range.
        """
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._error(value, "a number", named)
        if self.whole and not isinstance(value, int):
            raise self._error(value, "a whole number", named)
        # Compare before any float(): an int with 400 digits has no float, but compares fine.
        if isinstance(value, float) and not math.isfinite(value):
            raise self._error(value, "a finite number", named)
        if isinstance(value, float) and value == 0 and math.copysign(1.0, value) < 0:
            raise self._error(value, "a number without a minus sign", named)
        below = value <= self.low if self.low_open else value < self.low
        above = value >= self.high if self.high_open else value > self.high
        if below or above:
            raise self._error(value, "", named)
        return value

    def _error(self, value: object, what: str, named: str) -> UsageError:
        shown = repr(value)
        if len(shown) > 24:  # 99999999999999999999999 is still readable; 400 digits are not
            shown = shown[:20] + "..."
        kind = f"{what} " if what else ""  # "must be in [0.2, 10000]", not "in range in ..."
        return UsageError(f"{named or '--' + self.flag} must be {kind}in {self}, not {shown}")


# Keys are the option names as on the command line (and in job files) without "--".
LIMITS: Final[dict[str, Limit]] = {
    limit.flag: limit
    for limit in (
        # Floor: at 0.2/s a request leaves every 5 s, so a run shows progress well inside any
        # deadline; it is also the cool-down's floor (pacing.budget.MIN_RATE), which a slower target
        # would sit under. 1e-300 was accepted and then waited 1e300 s for its first request.
        Limit(flag="rate", low=MIN_RATE_FLAG, high=10_000),
        Limit(flag="headroom", low=0, high=0.5, high_open=True),
        Limit(flag="concurrency", low=1, high=1000, whole=True),
        Limit(flag="max-attempts", low=1, high=100, whole=True),
        Limit(flag="item-deadline", low=0, high=86_400, low_open=True),
        Limit(flag="timeout", low=0, high=600, low_open=True),
        Limit(flag="grace", low=0, high=3600),
        Limit(flag="limiter-timeout", low=0, high=86_400, low_open=True),
        Limit(flag="max-delete", low=0, high=1_000_000, whole=True),
        Limit(flag="metrics-port", low=0, high=65535, whole=True),  # 0: any free port
        Limit(flag="metrics-push-interval", low=1, high=3600),
    )
}


def _positive(name: str, value: float) -> None:
    """Internal knobs (not flags): finite and positive, or a bug."""
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{name} must be a finite positive number, not {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    max_attempts: int = 8
    initial_s: float = 0.5
    max_delay_s: float = 30.0
    item_deadline_s: float = 300.0  # per item, across all its attempts
    retry_after_max_s: float = 60.0  # a server's Retry-After is honoured up to this

    def __post_init__(self) -> None:
        LIMITS["max-attempts"].check(self.max_attempts)
        LIMITS["item-deadline"].check(self.item_deadline_s)
        for name in ("initial_s", "max_delay_s", "retry_after_max_s"):
            _positive(name, getattr(self, name))
        if self.max_delay_s < self.initial_s:
            raise UsageError("backoff: need initial <= max delay")


@dataclass(frozen=True, slots=True, kw_only=True)
class Pacing:
    rate: float = float(spec.DOCUMENTED_RATE)  # the account's limit, requests per second
    headroom: float = DEFAULT_HEADROOM
    cooldown_s: float = 1.0  # pause for everyone after a FlowLimitExceeded
    recover_s: float = 10.0  # after the pause, time to climb from the lowered rate to the target
    # The headroom is where the margin starts; it then follows the jitter measured
    # (pacing/margin.py). False pins it (benchmarks and tests comparing against a fixed one).
    adapt: bool = True

    def __post_init__(self) -> None:
        LIMITS["rate"].check(self.rate)
        LIMITS["headroom"].check(self.headroom)
        _positive("cooldown_s", self.cooldown_s)
        _positive("recover_s", self.recover_s)

    @property
    def target(self) -> float:
        """What we actually aim at: the limit less the headroom."""
        return self.rate * (1 - self.headroom)


_REGION_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    manifest: Path
    ledger: Path
    endpoint: str = spec.DEFAULT_ENDPOINT
    region: str = spec.DEFAULT_REGION
    pacing: Pacing = field(default_factory=Pacing)
    concurrency: int | None = None  # None: the default (adaptive); else an explicit cap
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_s: float = 15.0  # one attempt, connect + answer
    grace_s: float = 10.0
    dry_run: bool = False
    skip_invalid: bool = False
    limiter_url: str | None = None
    limiter_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        check_endpoint(self.endpoint)
        # The region goes into the credential scope and a header: lowercase letters, digits
        # and dashes (cn-north-1), nothing a header could be split or smuggled with.
        if not _REGION_RE.fullmatch(self.region):
            raise UsageError(
                f"--region {self.region[:40]!r}: expected a region name such as cn-north-1 "
                "(lowercase letters, digits and dashes)"
            )
        if self.concurrency is not None:
            LIMITS["concurrency"].check(self.concurrency)
        if self.limiter_url is not None:
            check_limiter(self.limiter_url)
        LIMITS["timeout"].check(self.timeout_s)
        LIMITS["grace"].check(self.grace_s)
        LIMITS["limiter-timeout"].check(self.limiter_timeout_s)

    def public(self) -> dict[str, object]:
        """What the ledger header records: everything that shapes a run, no secrets."""
        return {
            "endpoint": redact_url(self.endpoint),
            "region": self.region,
            "rate": self.pacing.rate,
            "headroom": self.pacing.headroom,
            # What the runner really uses: an explicit cap, or the adaptive one.
            "concurrency": self.concurrency or f"adaptive, cap {DEFAULT_CAP}",
            "max_attempts": self.retry.max_attempts,
            "item_deadline_s": self.retry.item_deadline_s,
            "timeout_s": self.timeout_s,
            "skip_invalid": self.skip_invalid,
            "limiter": redact_url(self.limiter_url) if self.limiter_url else None,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandOptions:
    """What a command adds to Settings: where the account is and how to report."""

    sandbox_account: Path | None = None  # --sandbox: the embedded account's state file
    profile: str | None = None
    retry_rejected: bool = False
    json: bool = False
    job_name: str = ""  # the job file's stem, else the manifest's: the metrics' job_name
    metrics_file: Path | None = None
    log_file: Path | None = None  # --log-file: checked (logfile.check_log_file), not opened
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    metrics_push: str | None = None  # a Pushgateway's URL (metrics_push.check_push_url)
    metrics_push_interval_s: float = 15.0
