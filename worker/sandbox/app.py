"""The sandbox on a socket: aiohttp wiring, the arrival log, `/_sandbox/state`, `serve()`.

Every decision is taken and applied the moment a request arrives, then the configured latency
passes, then the answer goes out. So the arrival log and `/_sandbox/state` always agree with
each other, and tests judge the worker by them, not by the worker's own account.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import IO, Any

import orjson
from aiohttp import web

from worker.api import spec
from worker.sandbox import store
from worker.sandbox.config import FAULT_STATUS, SandboxConfig, new_keys
from worker.sandbox.envelope import ApiError, Envelopes
from worker.sandbox.faults import Fault
from worker.sandbox.gateway import Gateway, Incoming, Passed
from worker.sandbox.service import Service

MAX_BODY = 4 * 1024 * 1024


class SandboxApp:
    """A gateway in front of a service, and what an observer sees of both."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.codes: Counter[str] = Counter()
        self.arrivals = 0
        self.envelopes = Envelopes(self._now)
        self.gateway = Gateway(config, clock=time.monotonic, now=self._now)
        self.service = Service(
            clock=time.monotonic,
            forbid=config.forbid,
            list_lag_s=config.list_lag_ms / 1000,
            list_churn=config.list_churn,
            list_order=config.list_order,
            churn_every_s=config.churn_every_s,
            seed=config.seed,
        )
        self._latency_rng = random.Random(config.seed)
        self._log: IO[bytes] | None = None

    def open_log(self) -> None:
        if self.config.log is not None:
            self._log = open(self.config.log, "ab", buffering=0)  # noqa: SIM115 - closed in close_log

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def build(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/", self.handle)
        app.router.add_get("/_sandbox/state", self.state)
        app.router.add_route("*", "/{tail:.*}", self.not_found)
        return app

    # -- handlers ---------------------------------------------------------------------------

    async def not_found(self, request: web.Request) -> web.Response:
        action = request.query.get("Action", "")
        return self._error(
            action,
            ApiError(404, "InvalidActionOrVersion", "the action or version is not supported"),
        )

    async def state(self, request: web.Request) -> web.Response:
        body = {
            "groups": self.service.state(),
            "codes": dict(self.codes),
            "arrivals": self.arrivals,
        }
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        arrived_mono, arrived_wall = time.monotonic(), self._now().timestamp()
        self.arrivals += 1
        body = await request.read()
        incoming = Incoming(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
        )
        action = incoming.query.get("Action", "")
        about = _about(action, body)
        verdict = self.gateway.check(incoming, arrived=arrived_mono, name=about.get("name"))
        if not isinstance(verdict, Passed):
            return await self._answer_error(arrived_wall, verdict.ak, about, verdict.error)
        fault = verdict.fault
        if fault is not None and not fault.ambiguous:
            return await self._misbehave(request, arrived_wall, verdict.ak, about, fault)
        try:
            result = self.service.carry_out(action, body)
        except ApiError as error:
            return await self._answer_error(arrived_wall, verdict.ak, about, error)
        if fault is not None:  # ambiguous: done, but the client will not hear so
            return await self._misbehave(request, arrived_wall, verdict.ak, about, fault)
        self._record(arrived_wall, verdict.ak, about, 200, "")
        await self._latency()
        return web.Response(body=self.envelopes.ok(action, result), content_type="application/json")

    # -- answers ----------------------------------------------------------------------------

    async def _answer_error(
        self, arrived: float, ak: str, about: dict[str, Any], error: ApiError
    ) -> web.Response:
        self._record(arrived, ak, about, error.status, error.code)
        await self._latency()
        return self._error(about["action"], error)

    async def _misbehave(
        self, request: web.Request, arrived: float, ak: str, about: dict[str, Any], fault: Fault
    ) -> web.StreamResponse:
        status = FAULT_STATUS.get(fault.kind)
        self._record(arrived, ak, about, status, fault.kind)
        if fault.kind == "hang":
            await asyncio.sleep(self.config.hang_s)
        await self._latency()
        if status is None:  # drop, or a hang that ran out: close without an answer
            if request.transport is not None:
                request.transport.abort()
            return web.Response()
        return self._error(
            about["action"], ApiError(status, fault.kind, f"sandbox fault {fault.kind}")
        )

    def _record(
        self, arrived: float, ak: str, about: dict[str, Any], status: int | None, code: str
    ) -> None:
        self.codes[code or "OK"] += 1
        if self._log is not None:
            self._log.write(
                orjson.dumps(
                    {"t": arrived, "ak": ak, **about, "status": status, "code": code},
                    option=orjson.OPT_APPEND_NEWLINE,
                )
            )

    async def _latency(self) -> None:
        lo, hi = self.config.latency_ms
        if hi > 0:
            await asyncio.sleep(self._latency_rng.uniform(lo, hi) / 1000)

    def _error(self, action: str, error: ApiError) -> web.Response:
        return web.Response(
            status=error.status,
            body=self.envelopes.error(action, error.code, error.message),
            content_type="application/json",
        )

    def _now(self) -> datetime:
        return datetime.fromtimestamp(time.time() + self.config.clock_offset_s, UTC)


def _about(action: str, body: bytes) -> dict[str, Any]:
    """What the arrival log says a request is about, whatever else is wrong with it:
    `action`, `name` (null for List) and `page` (List's PageNum, else null)."""
    try:
        payload = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        payload = None
    if not isinstance(payload, dict):
        payload = {}
    name, page = payload.get("Name"), payload.get("PageNum")
    listing = action == spec.LIST
    return {
        "action": action,
        "name": name if isinstance(name, str) and not listing else None,
        "page": page if listing and isinstance(page, int) and not isinstance(page, bool) else None,
    }


# Here, beside the server it reports on: config.py stays free of server code (and of this
# module), so the command line can import it cheaply and no import circle forms.
@dataclass(frozen=True, slots=True)
class Running:
    """A sandbox that is listening: where it is and what it knows."""

    url: str
    keys: dict[str, str] = field(repr=False)
    app: SandboxApp = field(repr=False)


@asynccontextmanager
async def serve(config: SandboxConfig) -> AsyncIterator[Running]:
    """The in-process form: `async with serve(cfg) as sb: ... sb.url ...`. With a state
    file, the account (and, unless keys are given, the keys) come from it and go back to it
    when the block ends."""
    saved = None
    if config.state_file is not None:
        store.check_writable(config.state_file)
        saved = store.read_state(config.state_file)
    if not config.keys:
        config = replace(config, keys=saved.keys if saved and saved.keys else new_keys())
    state = SandboxApp(config)
    if saved is not None:
        state.service.load(saved.groups)
    if config.preload is not None:
        state.service.load(store.read_preload(config.preload))
    state.open_log()
    runner = web.AppRunner(
        state.build(), access_log=None, handler_cancellation=True, shutdown_timeout=1.0
    )
    try:
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        shown = f"[{host}]" if ":" in host else host
        yield Running(url=f"http://{shown}:{port}", keys=dict(config.keys), app=state)
    finally:
        await runner.cleanup()
        state.close_log()
        if config.state_file is not None:
            store.write_state(
                config.state_file,
                store.State(keys=dict(config.keys), groups=state.service.stored()),
            )
