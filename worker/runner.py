"""The run: composes the steps for every manifest line under one TaskGroup.

    manifest.read -> plan.decide -> queue -> N senders: pace -> sign -> send -> classify -> ledger

A bounded queue between one producer and `in_flight` senders keeps memory flat however long
the manifest is. Stopping has two stages (as arq and Kubernetes do it): `drain()` stops
taking items and aborts waits (pacing, backoff), recording those items as deferred, while
requests already on the wire may finish; the caller cancels the whole run after the grace
period or on a second signal. Every ledger write is synchronous, so a cancellation lands
either before a record or after it, never inside.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, assert_never
from urllib.parse import urlsplit

import structlog

from worker import __version__, api, manifest, plan
from worker.classify import (
    Abort,
    Answer,
    Created,
    Exists,
    Rejected,
    Retry,
    Throttled,
    backoff_s,
    classify,
)
from worker.errors import LimiterUnavailable, RunAborted
from worker.ledger import FSYNC_EVERY_S, Ledger
from worker.pacing import Pacer
from worker.settings import Settings
from worker.signing import Credentials, sign
from worker.transport import Transport

log = structlog.get_logger("worker")
T = TypeVar("T")
QUERY = {"Action": api.CREATE, "Version": api.VERSION}


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class Tally:
    """Live counts: outcomes of this run, skips, and what is still to do."""

    to_send: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    throttles: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> int:
        return sum(self.outcomes.values())


@dataclass(slots=True)
class Controls:
    """How a run is stopped gently: drain on the first signal, or when the limiter is lost."""

    draining: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str | None = None  # "signal" | "limiter"

    def drain(self, reason: str = "signal") -> None:
        if self.reason is None:
            self.reason = reason
        self.draining.set()


class _Stopped(Exception):
    """A wait was cut short by drain()."""


class Run:
    def __init__(self, *, settings: Settings, credentials: Credentials, scan: manifest.Scan,
                 ledger: Ledger, pacer: Pacer, controls: Controls,
                 wall: Callable[[], datetime] = utcnow, rng: random.Random | None = None,
                 on_tick: Callable[[Tally], None] | None = None) -> None:
        self.settings = settings
        self.credentials = credentials
        self.scan = scan
        self.ledger = ledger
        self.pacer = pacer
        self.controls = controls
        self.wall = wall
        self.rng = rng or random.Random()
        self.on_tick = on_tick
        self.tally = Tally()
        self.run_id = uuid.uuid4().hex
        self.failure: LimiterUnavailable | None = None
        self.plan = plan.Plan(Counter())
        self._host = urlsplit(settings.endpoint).netloc

    def count_plan(self) -> plan.Plan:
        self.plan = plan.count(manifest.read(self.scan), self.ledger.state.latest)
        self.tally.to_send = self.plan.to_send
        return self.plan

    async def execute(self, transport: Transport) -> Tally:
        self.ledger.append({
            "type": "run", "run_id": self.run_id, "started": self._stamp(),
            "version": __version__, "manifest": str(self.scan.path),
            "manifest_sha256": self.scan.sha256, "items": self.scan.groups + len(self.scan.invalid),
            "plan": dict(self.plan.counts), "settings": self.settings.public(),
        })
        queue: asyncio.Queue[manifest.Group | None] = asyncio.Queue(self.settings.in_flight * 2)
        try:
            async with asyncio.TaskGroup() as tg:
                ticker = tg.create_task(self._tick())
                senders = [tg.create_task(self._sender(queue, transport))
                           for _ in range(self.settings.in_flight)]
                await self._produce(queue)
                try:
                    for _ in senders:  # one end mark per sender
                        await self._unless_draining(queue.put(None))
                except _Stopped:
                    pass  # senders see the drain themselves
                await asyncio.gather(*senders)
                ticker.cancel()
        finally:
            self.ledger.append({
                "type": "end", "run_id": self.run_id, "finished": self._stamp(),
                "outcomes": dict(self.tally.outcomes), "skipped": dict(self.tally.skipped),
                "codes": dict(self.tally.codes), "throttles": self.tally.throttles,
                "interrupted": self.controls.reason == "signal",
                "stopped_by": self.controls.reason,
            })
        return self.tally

    # -- producer -------------------------------------------------------------------------

    async def _produce(self, queue: asyncio.Queue[manifest.Group | None]) -> None:
        for item in manifest.read(self.scan):
            if self.controls.draining.is_set():
                return
            decision = plan.decide(item, self.ledger.state.latest)
            if decision.do is plan.Do.SKIP:
                self.tally.skipped[decision.why] += 1
                continue
            if isinstance(item, manifest.Invalid):
                self._record_invalid(item)
                continue
            try:
                await self._unless_draining(queue.put(item))
            except _Stopped:
                return

    def _record_invalid(self, item: manifest.Invalid) -> None:
        now = self._stamp()
        self.ledger.append({
            "type": "result", "run_id": self.run_id, "name": item.name, "outcome": "invalid",
            "status": None, "code": "InvalidManifestLine", "message": str(item.problem),
            "request_id": "", "attempts": 0, "fingerprint": None, "line": item.line,
            "started": now, "finished": now,
        })
        self.tally.outcomes["invalid"] += 1
        log.warning("group.invalid", line=item.line, name=item.name, problem=str(item.problem))

    # -- senders --------------------------------------------------------------------------

    async def _sender(self, queue: asyncio.Queue[manifest.Group | None],
                      transport: Transport) -> None:
        while True:
            if self.controls.draining.is_set():
                return
            try:
                group = await self._unless_draining(queue.get())
            except _Stopped:
                return
            if group is None:
                return
            await self._provision(group, transport)

    async def _provision(self, group: manifest.Group, transport: Transport) -> None:
        policy = self.settings.retry
        started = self._stamp()
        deadline = time.monotonic() + policy.item_deadline_s
        attempts = 0  # failed sends; throttled answers do not use up an attempt
        sends = 0
        last: Answer | None = None
        while True:
            try:
                await self._unless_draining(self.pacer.acquire())
            except LimiterUnavailable as exc:
                # Never fall back to a private budget: stop taking work, let what is on the
                # wire finish, and end the run (exit 3).
                self.failure = exc
                self.controls.drain("limiter")
                if sends == 0:
                    return None
                return self._finish(group, "deferred", last, started, sends)
            except _Stopped:
                if sends == 0:
                    return None  # never sent: it stays as it was (pending, or in doubt)
                return self._finish(group, "deferred", last, started, sends)
            sends += 1
            self.ledger.append({
                "type": "intent", "run_id": self.run_id, "name": group.name, "line": group.line,
                "fingerprint": group.fingerprint, "attempt": sends, "at": self._stamp(),
                "body": group.payload,
            })
            # Signed here, after pacing let it go: an X-Date that waited in a queue goes stale.
            headers = sign(method="POST", host=self._host, path="/", query=QUERY,
                           content_type="application/json", body=group.body,
                           credentials=self.credentials, region=self.settings.region,
                           now=self.wall())
            verdict = classify(await transport.send(QUERY, headers, group.body))
            last = verdict.answer
            self.tally.codes[verdict.answer.code or "OK"] += 1
            match verdict:
                case Created():
                    return self._finish(group, "created", verdict.answer, started, sends)
                case Exists():
                    return self._finish(group, "exists", verdict.answer, started, sends)
                case Rejected():
                    return self._finish(group, "rejected", verdict.answer, started, sends)
                case Abort():
                    raise RunAborted(verdict.answer.code, verdict.answer.message, verdict.hint)
                case Throttled():
                    self.tally.throttles += 1
                    self.pacer.throttled()
                    delay = verdict.retry_after_s or 0.0
                case Retry():
                    attempts += 1
                    if attempts >= policy.max_attempts:
                        return self._finish(group, "deferred", verdict.answer, started, sends)
                    delay = backoff_s(attempts, policy, self.rng, verdict.retry_after_s)
                case _:
                    assert_never(verdict)
            if time.monotonic() + delay > deadline:
                return self._finish(group, "deferred", verdict.answer, started, sends)
            log.debug("group.retry_scheduled", name=group.name, code=verdict.answer.code,
                      delay_s=round(delay, 3), attempt=sends)
            try:
                await self._unless_draining(asyncio.sleep(delay))
            except _Stopped:
                return self._finish(group, "deferred", verdict.answer, started, sends)

    def _finish(self, group: manifest.Group, outcome: str, answer: Answer | None,
                started: str, sends: int) -> None:
        """Record the outcome. Synchronous on purpose: no await may split decide and write."""
        record: dict[str, Any] = {
            "type": "result", "run_id": self.run_id, "name": group.name, "outcome": outcome,
            "status": answer.status if answer else None,
            "code": answer.code if answer else "Interrupted",
            "message": answer.message if answer else "stopped before an answer",
            "request_id": answer.request_id if answer else "",
            "attempts": sends, "fingerprint": group.fingerprint, "line": group.line,
            "started": started, "finished": self._stamp(),
        }
        if outcome not in ("created", "exists"):
            record["body"] = group.payload  # so `report --failed` can rebuild the line
        self.ledger.append(record)
        self.tally.outcomes[outcome] += 1
        event = log.info if outcome in ("created", "exists") else log.warning
        extra = {k: record[k] for k in ("code", "message") if record[k] and outcome != "created"}
        event(f"group.{outcome}", name=group.name, line=group.line, attempts=sends,
              status=record["status"], request_id=record["request_id"] or None, **extra)

    # -- helpers --------------------------------------------------------------------------

    async def _unless_draining(self, aw: Awaitable[T]) -> T:
        """Await `aw`, or raise _Stopped as soon as drain() is called."""
        if self.controls.draining.is_set():
            if asyncio.iscoroutine(aw):
                aw.close()
            raise _Stopped
        task = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self.controls.draining.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not task.done():
                task.cancel()
        if task.done() and not task.cancelled():
            return task.result()
        raise _Stopped

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(FSYNC_EVERY_S)
            await asyncio.to_thread(self.ledger.sync)
            if self.on_tick is not None:
                self.on_tick(self.tally)

    def _stamp(self) -> str:
        return self.wall().isoformat(timespec="milliseconds").replace("+00:00", "Z")
