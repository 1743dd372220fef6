"""The local Live API: a strict stand-in for the pull-to-push group actions.

Used by `run --sandbox` (the quick start), by every end-to-end test and by the benchmarks.
It checks what the real gateway checks (signature over the listed headers, body hash,
clock skew, a strict sliding one-second window per access key, the body rules) and it can
misbehave on purpose, deterministically for a seed: retryable faults, ambiguous creates (the
group is created, the client is told 504 or loses the connection), refusals by rule.

Every decision is taken and applied the moment a request arrives, then the configured
latency passes, then the answer goes out. So the arrival log and `/_sandbox/state` always
agree with each other, and tests judge the worker by them, not by the worker's own account.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import itertools
import random
import re
import secrets
import signal
from collections import Counter, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final

import orjson
from aiohttp import web

from worker import api, signing
from worker.errors import UsageError

# Faults a request may be answered with instead of being carried out (nothing changes).
FAULTS: Final = ("CommonErr", "InternalError", "InternalServiceError",
                 "ServiceUnavailableTemp", "InternalServiceTimeout", "drop", "hang")
_FAULT_STATUS: Final = {"CommonErr": 200, "InternalError": 500, "InternalServiceError": 502,
                        "ServiceUnavailableTemp": 503, "InternalServiceTimeout": 504}
# Ways the server misbehaves after it *has* created the group.
AMBIGUOUS: Final = ("InternalServiceTimeout", "drop")

_AUTH_RE: Final = re.compile(
    r"HMAC-SHA256 Credential=(?P<ak>[^/\s]+)/(?P<date>\d{8})/(?P<region>[^/\s]+)/"
    r"(?P<service>[^/\s]+)/request, SignedHeaders=(?P<signed>[a-z0-9;-]+), "
    r"Signature=(?P<sig>[0-9a-f]{64})"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxConfig:
    host: str = "127.0.0.1"
    port: int = 0
    rate: int = api.DOCUMENTED_RATE  # requests per sliding window per access key
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
    forbid: str | None = None  # regex; a Name or ProjectName matching it gets 403
    hang_s: float = 60.0

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


@dataclass(slots=True)
class _Group:
    name: str
    project: str
    tags: list[dict[str, str]]
    status: int = 0
    created: int = 0  # times the create was carried out (more than 1 would be a bug)
    exist_answers: int = 0
    requests: int = 0


class _Answer(Exception):
    """Raised inside the handler to answer with an error envelope."""

    def __init__(self, status: int, code: str, message: str = "") -> None:
        self.status, self.code, self.message = status, code, message or code


class SandboxApp:
    """State and request handling; `serve` below puts it on a socket."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.groups: dict[str, _Group] = {}
        self.codes: Counter[str] = Counter()
        self.arrivals = 0
        self._windows: dict[str, deque[float]] = {}
        self._seen: Counter[tuple[str, str]] = Counter()
        self._ids = itertools.count(1)
        self._latency_rng = random.Random(config.seed)
        self._forbid = re.compile(config.forbid) if config.forbid else None
        self._log: IO[bytes] | None = None

    def open_log(self) -> None:
        if self.config.log is not None:
            self._log = open(self.config.log, "ab", buffering=0)  # noqa: SIM115 - closed in close_log

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def build(self) -> web.Application:
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_post("/", self.handle)
        app.router.add_get("/_sandbox/state", self.state)
        app.router.add_route("*", "/{tail:.*}", self.not_found)
        return app

    # -- handlers -------------------------------------------------------------------------

    async def not_found(self, request: web.Request) -> web.Response:
        return self._error(request.query.get("Action", ""), 404, "InvalidActionOrVersion",
                           "the action or version is not supported")

    async def state(self, request: web.Request) -> web.Response:
        groups = [
            {"Name": g.name, "ProjectName": g.project, "Tags": g.tags, "Status": g.status,
             "created": g.created, "exist_answers": g.exist_answers, "requests": g.requests}
            for g in self.groups.values()
        ]
        body = {"groups": groups, "codes": dict(self.codes), "arrivals": self.arrivals}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        arrived_mono, arrived_wall = loop.time(), self._now().timestamp()
        self.arrivals += 1
        body = await request.read()
        action = request.query.get("Action", "")
        ak, name, fault, ambiguous = "", _name_in(body), None, False
        try:
            if action not in api.GROUP_ACTIONS or request.query.get("Version") != api.VERSION:
                raise _Answer(404, "InvalidActionOrVersion",
                              "the action or version is not supported")
            ak = self._authenticate(request, body)
            self._admit(ak, arrived_mono)
            payload = _decode(body)
            fault, ambiguous = self._fault(action, name)
            if fault is not None and not ambiguous:
                return await self._misbehave(request, arrived_wall, ak, action, name, fault)
            result = self._carry_out(action, payload)
        except _Answer as answer:
            self._record(arrived_wall, ak, action, name, answer.status, answer.code)
            await self._latency()
            return self._error(action, answer.status, answer.code, answer.message)
        if fault is not None:  # ambiguous: done, but the client will not hear so
            return await self._misbehave(request, arrived_wall, ak, action, name, fault)
        self._record(arrived_wall, ak, action, name, 200, "")
        await self._latency()
        return self._ok(action, result)

    # -- checks ---------------------------------------------------------------------------

    def _authenticate(self, request: web.Request, body: bytes) -> str:
        header = request.headers.get("Authorization", "")
        m = _AUTH_RE.fullmatch(header)
        if m is None:
            raise _Answer(401, "MissingAuthenticationToken", "the request is not signed")
        ak = m["ak"]
        secret = self.config.keys.get(ak)
        if secret is None:
            raise _Answer(401, "InvalidAccessKey", f"the access key {ak} does not exist")
        xdate = request.headers.get("X-Date", "")
        try:
            stamp = datetime.strptime(xdate, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        except ValueError:
            raise _Answer(400, "InvalidTimestamp", "X-Date is missing or malformed") from None
        skew = abs((self._now() - stamp).total_seconds())
        if skew > self.config.max_skew_s:
            raise _Answer(400, "InvalidTimestamp",
                          f"X-Date is {skew:.0f}s away from the server time")
        signed = m["signed"].split(";")
        if (m["date"] != xdate[:8] or m["region"] != api.DEFAULT_REGION
                or m["service"] != api.SERVICE or signed != sorted(set(signed))
                or not {"host", "x-date", "x-content-sha256"} <= set(signed)
                or ("X-Security-Token" in request.headers and "x-security-token" not in signed)):
            raise _Answer(401, "SignatureDoesNotMatch",
                          "the credential scope or header list is wrong")
        body_sha256 = hashlib.sha256(body).hexdigest()
        if request.headers.get("X-Content-Sha256") != body_sha256:
            raise _Answer(401, "SignatureDoesNotMatch", "X-Content-Sha256 is not the body's hash")
        headers: dict[str, str] = {}
        for h in signed:
            if h not in request.headers:
                raise _Answer(401, "SignatureDoesNotMatch", f"signed header {h} is missing")
            value = request.headers[h].strip()
            headers[h] = signing.canonical_host(value) if h == "host" else value
        canonical = signing.canonical_request(
            method=request.method, path=request.path, query=dict(request.query),
            headers=headers, signed=signed, body_sha256=body_sha256,
        )
        scope = f"{m['date']}/{m['region']}/{m['service']}/request"
        key = signing.signing_key(secret, m["date"], m["region"], m["service"])
        want = hmac.new(key, signing.string_to_sign(xdate, scope, canonical).encode(),
                        hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, m["sig"]):
            raise _Answer(401, "SignatureDoesNotMatch", "the signature does not match")
        return ak

    def _admit(self, ak: str, now: float) -> None:
        """Strict sliding window: at most `rate` admitted arrivals in any `window_s`."""
        window = self._windows.setdefault(ak, deque())
        while window and window[0] <= now - self.config.window_s:
            window.popleft()
        if len(window) >= self.config.rate:
            raise _Answer(429, "FlowLimitExceeded",
                          f"more than {self.config.rate} requests in {self.config.window_s}s")
        window.append(now)

    def _fault(self, action: str, name: str | None) -> tuple[str | None, bool]:
        """(fault kind or None, whether the request is carried out first: ambiguous).
        Deterministic for (seed, action, name, n-th admitted request for that name)."""
        key = (action, name or "")
        self._seen[key] += 1
        digest = hashlib.sha256(
            f"{self.config.seed}|{action}|{name}|{self._seen[key]}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        pick = int.from_bytes(digest[8:16], "big")
        if action == api.CREATE and u < self.config.ambiguous_rate:
            return AMBIGUOUS[pick % len(AMBIGUOUS)], True
        if u < self.config.ambiguous_rate + self.config.fault_rate and self.config.faults:
            return self.config.faults[pick % len(self.config.faults)], False
        return None, False

    # -- actions --------------------------------------------------------------------------

    def _carry_out(self, action: str, payload: dict[str, Any]) -> dict[str, Any] | None:
        if action == api.CREATE:
            self._create(payload)
            return None
        if action == api.LIST:
            return self._list(payload)
        name = _check_name(payload.get("Name"))
        group = self.groups.get(name)
        if group is None:
            raise _Answer(404, "ResourceNotFound", f"group {name} does not exist")
        group.requests += 1
        if action == api.UPDATE:
            group.tags = _check_tags(payload.get("Tags", []))
        else:
            group.status = 1
        return None

    def _create(self, payload: dict[str, Any]) -> None:
        name = _check_name(payload.get("Name"))
        project = payload.get("ProjectName", api.DEFAULT_PROJECT)
        if not isinstance(project, str):
            raise _Answer(400, "InvalidParam.BindError", "ProjectName must be a string")
        tags = _check_tags(payload.get("Tags", []))
        if self._forbid and (self._forbid.search(name) or self._forbid.search(project)):
            raise _Answer(403, "RequestForbidden", "the account has no such resource")
        group = self.groups.get(name)
        if group is not None:
            group.requests += 1
            group.exist_answers += 1
            raise _Answer(429, "RequestLimitExceeded.Exist",
                          "the resource requested to be created already exists, please rename it")
        self.groups[name] = _Group(name=name, project=project or api.DEFAULT_PROJECT,
                                   tags=tags, created=1, requests=1)

    def _list(self, payload: dict[str, Any]) -> dict[str, Any]:
        page, size = payload.get("PageNum", 1), payload.get("PageSize", 10)
        statuses = payload.get("StatusList", [0])
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (page, size)) \
                or not isinstance(statuses, list):
            raise _Answer(400, "InvalidParam.BindError", "PageNum, PageSize, StatusList types")
        if not (1 <= page <= 1000 and 1 <= size <= 1000):
            raise _Answer(400, "InvalidParam", "PageNum and PageSize must lie in 1-1000")
        chosen = [g for g in self.groups.values() if g.status in statuses]
        items = [{"Name": g.name, "ProjectName": g.project, "Status": g.status, "Tags": g.tags}
                 for g in chosen[(page - 1) * size: page * size]]
        return {"List": items, "Total": len(chosen)}

    # -- answers --------------------------------------------------------------------------

    async def _misbehave(self, request: web.Request, arrived: float, ak: str, action: str,
                         name: str | None, fault: str) -> web.StreamResponse:
        status = _FAULT_STATUS.get(fault)
        self._record(arrived, ak, action, name, status, fault)
        if fault == "hang":
            await asyncio.sleep(self.config.hang_s)
        await self._latency()
        if status is None or fault == "hang":  # drop: close the socket without an answer
            if request.transport is not None:
                request.transport.abort()
            return web.Response()
        return self._error(action, status, fault, f"sandbox fault {fault}")

    def _record(self, arrived: float, ak: str, action: str, name: str | None,
                status: int | None, code: str) -> None:
        self.codes[code or "OK"] += 1
        if self._log is not None:
            self._log.write(orjson.dumps(
                {"t": arrived, "ak": ak, "action": action, "name": name,
                 "status": status, "code": code}, option=orjson.OPT_APPEND_NEWLINE))

    async def _latency(self) -> None:
        lo, hi = self.config.latency_ms
        if hi > 0:
            await asyncio.sleep(self._latency_rng.uniform(lo, hi) / 1000)

    def _metadata(self, action: str) -> dict[str, Any]:
        return {"RequestId": f"{self._now():%Y%m%d%H%M%S}{next(self._ids):017X}",
                "Action": action, "Version": api.VERSION, "Service": api.SERVICE,
                "Region": api.DEFAULT_REGION}

    def _ok(self, action: str, result: dict[str, Any] | None) -> web.Response:
        body: dict[str, Any] = {"ResponseMetadata": self._metadata(action)}
        if result is not None:
            body["Result"] = result
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    def _error(self, action: str, status: int, code: str, message: str) -> web.Response:
        meta = self._metadata(action)
        meta["Error"] = {"Code": code, "Message": message}
        return web.Response(status=status, body=orjson.dumps({"ResponseMetadata": meta}),
                            content_type="application/json")

    def _now(self) -> datetime:
        return datetime.fromtimestamp(
            datetime.now(UTC).timestamp() + self.config.clock_offset_s, UTC)


def _name_in(body: bytes) -> str | None:
    """The Name a request is about, for the arrival log, whatever else is wrong with it."""
    try:
        payload = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None
    name = payload.get("Name") if isinstance(payload, dict) else None
    return name if isinstance(name, str) else None


def _decode(body: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        raise _Answer(400, "InvalidParam.BindError",
                      "Request parameter error, please check input data") from None
    if not isinstance(payload, dict):
        raise _Answer(400, "InvalidParam.BindError", "the body must be a JSON object")
    return payload


def _check_name(name: object) -> str:
    if name is None:
        raise _Answer(400, "InvalidParam", "Name is required")
    if not isinstance(name, str):
        raise _Answer(400, "InvalidParam.BindError", "Name must be a string")
    if (problem := api.name_problem(name)) is not None:
        raise _Answer(400, "InvalidParam", f"Name {problem}")
    return name


def _check_tags(tags: object) -> list[dict[str, str]]:
    if not isinstance(tags, list) or not all(
        isinstance(t, dict) and all(isinstance(t.get(k, ""), str) for k in api.TAG_FIELDS)
        for t in tags
    ):
        raise _Answer(400, "InvalidParam.BindError", "Tags must be a list of string objects")
    for field_name, reason in api.tags_problems(tags):
        if not reason.startswith("unknown field"):  # the real binding ignores extra fields
            raise _Answer(400, "InvalidParam", f"{field_name} {reason}")
    return [{"Key": t["Key"], "Value": t["Value"], "Category": t["Category"]} for t in tags]


def new_keys() -> dict[str, str]:
    """A throwaway access key pair for a sandbox nobody configured."""
    return {"AKSANDBOX" + secrets.token_hex(6).upper(): secrets.token_urlsafe(24)}


@dataclass(frozen=True, slots=True)
class Running:
    """A sandbox that is listening: where it is and what it knows."""

    url: str
    keys: dict[str, str] = field(repr=False)
    app: SandboxApp = field(repr=False)


@asynccontextmanager
async def serve(config: SandboxConfig) -> AsyncIterator[Running]:
    """The in-process form: `async with serve(cfg) as sb: ... sb.url ...`."""
    if not config.keys:
        config = replace(config, keys=new_keys())
    state = SandboxApp(config)
    state.open_log()
    runner = web.AppRunner(state.build(), access_log=None, handler_cancellation=True,
                           shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        shown = f"[{host}]" if ":" in host else host
        yield Running(url=f"http://{shown}:{port}", keys=dict(config.keys), app=state)
    finally:
        await runner.cleanup()
        state.close_log()


# -- command line: `worker sandbox` ---------------------------------------------------------

def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    s.add_argument("--rate", type=int, default=api.DOCUMENTED_RATE,
                   help="requests per sliding second per access key")
    s.add_argument("--keys", help="AK:SK[,AK:SK...] (default: a throwaway pair, printed)")
    s.add_argument("--fault-rate", type=float, default=0.0)
    s.add_argument("--ambiguous-rate", type=float, default=0.0)
    s.add_argument("--faults", help=f"comma list of fault kinds (default all: "
                   f"{','.join(FAULTS)})")
    s.add_argument("--latency-ms", default="0-0", help="A-B, uniform (default 0-0)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--log", help="arrival log, JSONL")
    s.add_argument("--forbid", help="regex: a Name or ProjectName matching it gets 403")
    s.add_argument("--hang", type=float, default=60.0, help="seconds a `hang` fault lasts")
    s.add_argument("--max-skew", type=float, default=900.0, help="X-Date tolerance, seconds")
    s.add_argument("--clock-offset", type=float, default=0.0,
                   help="seconds the sandbox's clock is ahead of the real one")


def main(args: argparse.Namespace) -> int:
    keys = dict(_pair(p) for p in args.keys.split(",")) if args.keys else new_keys()
    config = SandboxConfig(
        host=args.host, port=args.port, rate=args.rate, keys=keys, fault_rate=args.fault_rate,
        ambiguous_rate=args.ambiguous_rate, latency_ms=_range(args.latency_ms), seed=args.seed,
        log=Path(args.log) if args.log else None, forbid=args.forbid, hang_s=args.hang,
        max_skew_s=args.max_skew, clock_offset_s=args.clock_offset,
        faults=tuple(args.faults.split(",")) if args.faults else FAULTS,
    )
    asyncio.run(_serve(config))
    return 0


async def _serve(config: SandboxConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serve(config) as sb:
        print(f"sandbox listening on {sb.url}", flush=True)
        for ak, sk in sb.keys.items():
            print(f"credentials: VOLC_ACCESSKEY={ak} VOLC_SECRETKEY={sk}", flush=True)
        print(f"try: VOLC_ACCESSKEY=... VOLC_SECRETKEY=... python -m worker run MANIFEST "
              f"--endpoint {sb.url}", flush=True)
        await stop.wait()
    print("sandbox stopped", flush=True)


def _pair(text: str) -> tuple[str, str]:
    ak, sep, sk = text.partition(":")
    if not (sep and ak and sk):
        raise UsageError(f"--keys: expected AK:SK, got {ak or '?'}:...")
    return ak, sk


def _range(text: str) -> tuple[float, float]:
    lo, sep, hi = text.partition("-")
    try:
        a, b = float(lo), float(hi if sep else lo)
    except ValueError:
        raise UsageError(f"--latency-ms: expected A-B in milliseconds, got {text!r}") from None
    if not 0 <= a <= b:
        raise UsageError("--latency-ms: need 0 <= A <= B")
    return a, b
