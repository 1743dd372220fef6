"""The sandbox's gateway: what stands in front of every action. It checks the action and
version, authenticates with `signing.verify`, applies the per-key rate window, and decides
the request's fault. It knows nothing of groups."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from worker.api import signing, spec
from worker.sandbox.config import SandboxConfig
from worker.sandbox.envelope import ApiError
from worker.sandbox.faults import Fault, Faults
from worker.sandbox.window import SlidingWindow

# InvalidTimestamp is a 400 at the real gateway; every other signature refusal is a 401.
_REFUSAL_STATUS = {"InvalidTimestamp": 400}


@dataclass(frozen=True, slots=True, kw_only=True)
class Incoming:
    """A request as it arrived; `headers` keyed by lowercase name."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str] = field(repr=False)
    body: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Passed:
    """Let through to the service; `fault` (if any) says how to misbehave."""

    ak: str
    action: str
    fault: Fault | None


@dataclass(frozen=True, slots=True)
class Refused:
    ak: str  # "" until the request is authenticated
    error: ApiError


class Gateway:
    def __init__(
        self, config: SandboxConfig, *, clock: Callable[[], float], now: Callable[[], datetime]
    ) -> None:
        self.config = config
        self._now = now
        self.window = SlidingWindow(rate=config.rate, window_s=config.window_s, clock=clock)
        self.faults = Faults(
            seed=config.seed,
            fault_rate=config.fault_rate,
            ambiguous_rate=config.ambiguous_rate,
            kinds=config.faults,
            timeout_first_create=config.timeout_first_create,
        )

    def check(self, request: Incoming, *, arrived: float, name: str | None) -> Passed | Refused:
        """In the real gateway's order: route, signature, rate window, then faults. `arrived`
        is the window clock's reading when the request arrived; `name` the body's Name, if
        any (faults are drawn per action and Name)."""
        action = request.query.get("Action", "")
        if action not in spec.GROUP_ACTIONS or request.query.get("Version") != spec.VERSION:
            return Refused(
                "",
                ApiError(404, "InvalidActionOrVersion", "the action or version is not supported"),
            )
        verdict = signing.verify(
            method=request.method,
            path=request.path,
            query=request.query,
            headers=request.headers,
            body=request.body,
            secret_for=self.config.keys.get,
            now=self._now(),
            max_skew_s=self.config.max_skew_s,
            region=spec.DEFAULT_REGION,
        )
        if isinstance(verdict, signing.Refused):
            status = _REFUSAL_STATUS.get(verdict.code, 401)
            return Refused("", ApiError(status, verdict.code, verdict.message))
        ak = verdict.access_key
        if not self.window.admit(ak, arrived):
            return Refused(
                ak,
                ApiError(
                    429,
                    "FlowLimitExceeded",
                    f"more than {self.config.rate} requests in {self.config.window_s}s",
                ),
            )
        return Passed(ak, action, self.faults.next(action, name))
