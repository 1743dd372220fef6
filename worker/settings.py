"""Settings: frozen values built once by the CLI and passed down explicitly."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from worker import api
from worker.errors import UsageError

# Pace a little under the limit. The server stamps arrivals, not our sends: a few ms of
# jitter between the two must not push an 11th request into someone's sliding second.
DEFAULT_HEADROOM = 0.03
# Latency the default concurrency is sized for: in-flight = rate x latency (Little's law).
DESIGN_LATENCY_S = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    max_attempts: int = 8
    initial_s: float = 0.5
    max_delay_s: float = 30.0
    item_deadline_s: float = 300.0  # per item, across all its attempts
    retry_after_max_s: float = 60.0  # a server's Retry-After is honoured up to this

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise UsageError("--max-attempts must be at least 1")
        if self.initial_s <= 0 or self.max_delay_s < self.initial_s:
            raise UsageError("backoff: need 0 < initial <= max delay")
        if self.item_deadline_s <= 0:
            raise UsageError("--item-deadline must be positive")


@dataclass(frozen=True, slots=True, kw_only=True)
class Pacing:
    rate: float = float(api.DOCUMENTED_RATE)  # the account's limit, requests per second
    headroom: float = DEFAULT_HEADROOM
    cooldown_s: float = 1.0  # pause for everyone after a FlowLimitExceeded
    recover_s: float = 10.0  # after the pause, time to climb from the lowered rate to the target

    def __post_init__(self) -> None:
        if not (0 < self.rate <= 10_000):
            raise UsageError("--rate must lie in (0, 10000]")
        if not (0 <= self.headroom < 0.5):
            raise UsageError("headroom must lie in [0, 0.5)")

    @property
    def target(self) -> float:
        """What we actually aim at: the limit less the headroom."""
        return self.rate * (1 - self.headroom)


def default_concurrency(rate: float) -> int:
    """Enough requests in flight to keep `rate` going at DESIGN_LATENCY_S per answer."""
    return max(4, math.ceil(rate * DESIGN_LATENCY_S * 1.25))


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    manifest: Path
    ledger: Path
    endpoint: str = api.DEFAULT_ENDPOINT
    region: str = api.DEFAULT_REGION
    pacing: Pacing = field(default_factory=Pacing)
    concurrency: int = 0  # 0: default_concurrency(pacing.rate)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_s: float = 15.0  # one attempt, connect + answer
    grace_s: float = 10.0
    dry_run: bool = False
    skip_invalid: bool = False
    limiter_url: str | None = None
    limiter_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        check_endpoint(self.endpoint)
        if self.concurrency < 0:
            raise UsageError("--concurrency must be positive")
        if self.limiter_url is not None and not self.limiter_url.startswith(
                ("redis://", "rediss://", "unix://")):
            raise UsageError(f"--limiter {self.limiter_url!r}: expected redis://HOST:PORT/DB")
        if self.timeout_s <= 0 or self.grace_s < 0:
            raise UsageError("--timeout must be positive and --grace not negative")

    @property
    def in_flight(self) -> int:
        return self.concurrency or default_concurrency(self.pacing.rate)

    def public(self) -> dict[str, object]:
        """What the ledger header records: everything that shapes a run, no secrets."""
        return {
            "endpoint": self.endpoint, "region": self.region, "rate": self.pacing.rate,
            "headroom": self.pacing.headroom, "concurrency": self.in_flight,
            "max_attempts": self.retry.max_attempts, "item_deadline_s": self.retry.item_deadline_s,
            "timeout_s": self.timeout_s, "skip_invalid": self.skip_invalid,
            "limiter": redact_url(self.limiter_url) if self.limiter_url else None,
        }


def check_endpoint(endpoint: str) -> None:
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--endpoint {endpoint!r}: expected http(s)://HOST[:PORT]")
    if parts.path not in ("", "/") or parts.query:
        raise UsageError(f"--endpoint {endpoint!r}: give only scheme, host and port")
    # Plain http would show the signed request (and any STS token) to the network.
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise UsageError(f"--endpoint {endpoint!r}: plain http is allowed only to loopback")


def _is_loopback(host: str) -> bool:
    return host == "localhost" or host == "::1" or host.startswith("127.")


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***, for logs and the ledger header."""
    password = urlsplit(url).password
    return url.replace(f":{password}@", ":***@") if password else url
