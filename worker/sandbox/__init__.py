"""The local Live API: a strict stand-in for the pull-to-push group actions, split as the
real system is: a gateway (signature, rate window, faults) in front of a service (groups).

Used by `run --sandbox` (the quick start), by every end-to-end test and by the benchmarks.
Importing this package is cheap: aiohttp's server loads only when a sandbox starts.

    config    SandboxConfig, FAULTS, new_keys               (no server code)
    envelope  ApiError, response envelopes                  (bottom layer)
    window    the strict sliding window (clock injected)
    faults    deterministic faults for (seed, action, Name, n)
    store     preload manifests and the state file
    gateway   route, signing.verify, window, faults         -> envelope, window, faults
    service   the groups and the four actions               -> envelope, store
    app       aiohttp wiring, arrival log, /_sandbox/state, serve() -> Running
    process   the sandbox as a child process (tests, benchmarks)   (standard library)
    cli       `worker sandbox` options and process
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

from worker.sandbox.cli import add_arguments, main
from worker.sandbox.config import FAULTS, SandboxConfig, new_keys

if TYPE_CHECKING:
    from worker.sandbox.app import Running

__all__ = ["FAULTS", "Running", "SandboxConfig", "add_arguments", "main", "new_keys", "serve"]


def serve(config: SandboxConfig) -> AbstractAsyncContextManager[Running]:
    """`async with serve(SandboxConfig(...)) as sb: sb.url, sb.keys, sb.app`."""
    from worker.sandbox.app import serve as serve_app  # aiohttp.web loads only here

    return serve_app(config)


def __getattr__(name: str) -> object:
    # `from worker.sandbox import Running` works, yet loads aiohttp only when asked for.
    if name == "Running":
        from worker.sandbox.app import Running

        return Running
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
