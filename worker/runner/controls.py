"""Stopping a run gently: the drain that the signal handler and the runner both pull.

Stopping has two stages (as arq and Kubernetes do it). `drain()` stops the taking of new
work: what waits is recorded or stays pending, requests already on the wire may finish. The
caller cancels the whole run after the grace period or on a second signal.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from worker.ledger.records import StopReason


@dataclass(slots=True)
class Controls:
    """How a run is stopped gently. The CLI's signal handler and the runner both drain it."""

    reason: StopReason | None = None
    writes_started: bool = False  # a write request went out: a signal now drains gently
    _on_drain: list[Callable[[], None]] = field(default_factory=list)

    @property
    def draining(self) -> bool:
        return self.reason is not None

    def drain(self, reason: StopReason = StopReason.SIGNAL) -> None:
        if self.reason is not None:
            return
        self.reason = reason
        for callback in self._on_drain:
            callback()

    def on_drain(self, callback: Callable[[], None]) -> None:
        self._on_drain.append(callback)
        if self.reason is not None:
            callback()

    def forget(self, callback: Callable[[], None]) -> None:
        self._on_drain.remove(callback)


async def interruptible(controls: Controls, aw: Awaitable[None]) -> None:
    """Await `aw` unless the run drains first (reads and set-up, not the hot path): a drain
    cancels the awaiting task, as a signal would."""
    if controls.draining:
        if asyncio.iscoroutine(aw):
            aw.close()
        raise asyncio.CancelledError
    task = asyncio.ensure_future(aw)
    me = asyncio.current_task()
    assert me is not None

    def cancel() -> None:
        me.cancel()

    controls.on_drain(cancel)
    try:
        await task
    finally:
        controls.forget(cancel)
        if not task.done():
            task.cancel()
