"""The process's signals: SIGINT/SIGTERM become `Interrupted` before an event loop runs, and
a graceful stop while one does.

`install_early` is the first thing the process does (worker/__main__.py, before the heavy
imports), so a signal during start-up, the manifest scan or the ledger's opening is an orderly
exit 4, never the default disposition's silent 143. While a run's event loop is up,
`under_signals`'s handlers (loop.add_signal_handler) take over, and these come back when
the loop ends.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
from collections.abc import Coroutine
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

from worker.errors import Exit

if TYPE_CHECKING:
    from worker.runner.controls import Controls
    from worker.session import UnderSignals

SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)
INTERRUPTED_EARLY: Final = "interrupted before anything was sent; nothing was changed"


class Interrupted(BaseException):
    """A signal arrived while no event loop was running. A BaseException, like
    KeyboardInterrupt: no `except Exception` on the way may swallow it."""


# How often a signal held back during an import looks again whether the import is over.
HOLD_RETRY_S: Final = 0.005
_held: int | None = None  # a signal that arrived inside an import, not raised yet


def _raise(signum: int, frame: FrameType | None) -> None:
    """Raise Interrupted where the signal found the process, unless that is inside an
    import: an exception raised there surfaces inside whatever C extension's init is
    running (orjson's segfaulted on it: exit -11 instead of 4). Then the signal is held,
    and raised at the first moment outside the import (SIGALRM polls for it)."""
    global _held
    if _inside_import(frame):
        _held = signum
        signal.signal(signal.SIGALRM, _raise_held)
        signal.setitimer(signal.ITIMER_REAL, HOLD_RETRY_S)
        return
    _held = None
    raise Interrupted(signum)


def _raise_held(_alarm: int, frame: FrameType | None) -> None:
    if _held is not None:
        _raise(_held, frame)


def _inside_import(frame: FrameType | None) -> bool:
    """Some frame on the stack is the import machinery's (C code may lie in between)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def install_early() -> None:
    for sig in SIGNALS:
        signal.signal(sig, _raise)


Main = Coroutine[Any, Any, Exit]


def under_signals(grace_s: float) -> UnderSignals:
    """The session's way to run a coroutine: with SIGINT/SIGTERM handled in its event loop.

    The first signal drains the run (no new requests; those on the wire may finish for
    `grace_s`), then cancels it; a second signal cancels it at once. A signal that arrives
    before any write request went out cancels at once: there is nothing to wait for."""

    def run(main: Main, controls: Controls) -> Exit:
        # What is alive now (the modules, the manifest's scan, the ledger's state) is put out
        # of the cyclic collector's reach: its full collections then walk only what the run
        # allocates. Each one holds the event loop, and every send admitted meanwhile goes
        # out that much late: a 17 ms collection bunched two creates into one 1 s window
        # (a FlowLimitExceeded at 50/s, bench.latency's 2-4 s case, run after run).
        gc.freeze()
        code = asyncio.run(_guarded(main, controls, grace_s))
        if code is Exit.INTERRUPTED:
            print("stopped; run the same command again to resume", file=sys.stderr)
        return code

    return run


async def _guarded(main: Main, controls: Controls, grace_s: float) -> Exit:
    import structlog  # here, not above: install_early must come before the heavy imports

    from worker.ledger.records import StopReason

    log = structlog.get_logger("worker")
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    seen = 0

    def on_signal(signum: int) -> None:
        nonlocal seen
        seen += 1
        name = signal.Signals(signum).name
        controls.drain(StopReason.SIGNAL)
        if seen == 1 and controls.writes_started:
            log.warning(
                "run.stopping",
                signal=name,
                grace_s=grace_s,
                hint="requests on the wire may finish; signal again to stop at once",
            )
            loop.call_later(grace_s, task.cancel)
        else:
            log.warning("run.stopping_now", signal=name)
            task.cancel()

    for sig in SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await main
    except asyncio.CancelledError:
        return Exit.INTERRUPTED
    finally:
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)
        install_early()  # asyncio restored the defaults: ours again
