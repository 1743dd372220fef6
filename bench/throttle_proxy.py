"""A proxy in front of a sandbox that answers one chosen create 429 FlowLimitExceeded with
`Retry-After: 1` and forwards everything else: a lone throttle, for bench.latency.

It runs its own event loop in a thread, so the benchmark can stay synchronous. Headers go
through unchanged (Host included), so the sandbox verifies the worker's signature as signed.
"""

from __future__ import annotations

import asyncio
import threading

import aiohttp
import orjson
from aiohttp import web

from worker.api import spec

_HOP = {"content-length", "transfer-encoding", "connection"}


class ThrottleProxy:
    """Forwards to `upstream`; the `nth` create (1-based) is answered 429, Retry-After: 1."""

    def __init__(self, upstream: str, nth: int) -> None:
        self.upstream, self.nth = upstream.rstrip("/"), nth
        self.creates = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None

    def start(self) -> str:
        """Listen on a free loopback port; return its URL."""
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> str:
        self._client = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._client is not None:
            await self._client.close()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.query.get("Action") == spec.CREATE:
            self.creates += 1
            if self.creates == self.nth:
                error = {"Code": "FlowLimitExceeded", "Message": "bench: one lone throttle"}
                meta = {"RequestId": "bench", "Action": spec.CREATE, "Error": error}
                return web.Response(
                    status=429,
                    headers={"Retry-After": "1", "Content-Type": "application/json"},
                    body=orjson.dumps({"ResponseMetadata": meta}),
                )
        assert self._client is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with self._client.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body
        ) as answer:
            payload = await answer.read()
            kept = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP}
            return web.Response(status=answer.status, headers=kept, body=payload)
