"""Run step: carries out a stream of writes under one rate budget and records each one.
`read` sends sync's List requests through the same budget and retries, unrecorded.

    work items -> dispatcher: capacity -> pace -> request task: intent -> sign -> send
               -> classify -> retry.next_step -> result record | back to the retry heap

One dispatcher task takes items (new ones from the source, due ones from the retry heap),
waits for room in flight and for the pacer, then starts one task per request on the wire.
So pacing is one wait, not thousands of parked senders; memory holds only what is in flight
and waiting to be retried, however long the source is.

The in-flight limit follows latency (Little's law; see worker.runner.concurrency).

Stopping has two stages (as arq and Kubernetes do it). `drain()` cancels the dispatcher,
which is only ever waiting (for room, for the pacer, for a retry to fall due): items it held
or that wait in the retry heap are recorded `deferred` if they were sent before, and stay
pending if not; requests already on the wire may finish. The caller cancels the whole run
after the grace period or on a second signal: what is still on the wire is then in doubt
(an intent without a result), which the next run resends. Every ledger write is synchronous,
so a cancellation lands before a record or after it, never inside.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import structlog

from worker.api import spec
from worker.api.classify import Answer, Retry, Throttled, Verdict, classify
from worker.api.signing import Credentials, sign
from worker.api.transport import Failure, Reachability, Sender
from worker.errors import (
    EndpointUnreachable,
    LedgerWriteError,
    LimiterUnavailable,
    ListingFailed,
    RunAborted,
    WorkerError,
    raise_first,
)
from worker.ledger.journal import FSYNC_EVERY_S
from worker.ledger.records import Action, Outcome, Record, Result, StopReason
from worker.pacing.budget import Pacer
from worker.runner.concurrency import Concurrency, machine_cap
from worker.runner.controls import Controls, interruptible
from worker.runner.retry import Answered, Finish, Stop, Wait, next_step
from worker.runner.stamps import stamp, utcnow
from worker.runner.tally import Tally
from worker.runner.work import Work, intent_of, log_result, result_of
from worker.settings import Settings

log = structlog.get_logger("worker")

_ACTION_NAMES = {Action.CREATE: spec.CREATE, Action.UPDATE: spec.UPDATE, Action.DELETE: spec.DELETE}


class Journal(Protocol):
    """What the runner needs of a ledger (worker.ledger.Ledger; a list in unit tests)."""

    def append(self, record: Record) -> None: ...
    def sync(self) -> None: ...


class Metrics(Protocol):
    """What the runner reports as it goes (worker.metrics.Metrics implements it)."""

    def request(self, action: str, code: str) -> None: ...
    def item(self, action: str, outcome: str) -> None: ...
    def throttle(self) -> None: ...
    def retry(self) -> None: ...
    def in_flight(self, delta: int) -> None: ...


class Runner:
    """Sends work items and records their outcomes; one instance per run."""

    def __init__(
        self,
        *,
        settings: Settings,
        credentials: Credentials,
        sender: Sender,
        pacer: Pacer,
        ledger: Journal | None,
        controls: Controls,
        run_id: str,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        wall: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
        reachability: Reachability | None = None,
        on_tick: Callable[[Tally], None] | None = None,
    ) -> None:
        self.settings = settings
        self.credentials = credentials
        self.sender = sender
        self.pacer = pacer
        self.ledger = ledger
        self.controls = controls
        self.run_id = run_id
        self.clock = clock
        self.sleep = sleep
        self.wall = wall
        self.rng = rng or random.Random()
        self.metrics = metrics
        self.on_tick = on_tick
        self.tally = Tally(started=clock())
        self.failure: WorkerError | None = None
        self.concurrency = Concurrency(
            rate=settings.pacing.rate, cap=machine_cap(settings.concurrency)
        )
        self.reachability = reachability or Reachability()
        self._host = urlsplit(settings.endpoint).netloc
        self._region = settings.region
        self._heap: list[tuple[float, int, Work]] = []
        self._seq = itertools.count()
        # Requests on the wire -> when each was sent, oldest first (a dict keeps that order).
        self._in_flight: dict[asyncio.Task[None], float] = {}
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._log: Any = log  # assembled once per run by `apply`
        self.sent_writes = 0  # write requests that left this process

    # -- one request ----------------------------------------------------------------------

    async def _send(self, action: str, body: bytes, now: datetime | None = None) -> Verdict:
        """Sign (after pacing admitted it: an X-Date that waited goes stale), send, classify.
        `now`: the wall time already read for this attempt's intent, if any."""
        query = {"Action": action, "Version": spec.VERSION}
        headers = sign(
            method="POST",
            host=self._host,
            path="/",
            query=query,
            content_type="application/json",
            body=body,
            credentials=self.credentials,
            region=self._region,
            now=now or self.wall(),
        )
        began = self.clock()
        if self.tally.first_send is None:
            self.tally.first_send = began
        self.tally.last_send = began
        result = await self.sender.send(query, headers, body)
        self.concurrency.observe(self.clock() - began)
        verdict = classify(
            result, region=self._region, retry_after_max_s=self.settings.retry.retry_after_max_s
        )
        code = verdict.answer.code or "OK"
        self.tally.requests += 1
        self.tally.codes[code] += 1
        if self.metrics is not None:
            self.metrics.request(action, code)
        if isinstance(result, Failure) and isinstance(verdict, Retry) and verdict.no_answer:
            if self.reachability.saw_no_answer(self.clock()):
                self._fail(
                    EndpointUnreachable(
                        f"{self.settings.public()['endpoint']} has not answered at all "
                        f"({verdict.answer.message}); check --endpoint, DNS and the network"
                    ),
                    StopReason.UNREACHABLE,
                )
        else:
            self.reachability.saw_answer()
        if isinstance(verdict, Throttled):
            self.tally.throttles += 1
            self.pacer.throttled(verdict.retry_after_s)
            if self.metrics is not None:
                self.metrics.throttle()
        return verdict

    async def read(self, action: str, body: bytes) -> dict[str, Any]:
        """A read (List): paced, retried by `retry.next_step` like any request, never
        recorded in the ledger. Returns the answer's `Result`; raises ListingFailed when it
        cannot be had, RunAborted when the API refuses it."""
        deadline = self.clock() + self.settings.retry.item_deadline_s
        attempts = 0
        while True:
            await self._paced()
            verdict = await self._send(action, body)
            if self.failure is not None:
                raise self.failure
            step = next_step(
                verdict,
                action=None,
                attempts=attempts,
                policy=self.settings.retry,
                rng=self.rng,
                now=self.clock(),
                deadline=deadline,
            )
            match step:
                case Answered():
                    return step.result
                case Stop():
                    raise RunAborted(step.answer.code, step.answer.message, step.hint)
                case Finish() if step.outcome is Outcome.DEFERRED:
                    raise ListingFailed(self._gave_up(action, step.answer))
                case Finish():
                    # Refused (InvalidParam, ResourceNotFound, …): no retry or later run
                    # changes that answer; a human must look (exit 7), nothing was written.
                    answer = step.answer
                    raise RunAborted(
                        answer.code or f"HTTP{answer.status}",
                        answer.message,
                        f"the API refused the {action} request; nothing was changed",
                    )
                case Wait():
                    if step.counts:
                        attempts += 1
                        self.tally.retries += 1
                    await interruptible(self.controls, self.sleep(step.delay_s))

    def _gave_up(self, action: str, answer: Answer) -> str:
        return (
            f"{action} failed: {answer.code or answer.status} {answer.message}".rstrip()
            + "; nothing was changed"
        )

    async def _paced(self) -> None:
        await interruptible(self.controls, self.pacer.acquire())

    # -- writes ---------------------------------------------------------------------------

    async def apply(self, source: Iterator[Work | Result]) -> Tally:
        """Carry out every item of `source` (a `Result` is recorded as it is: an invalid line
        or a conflict). Returns when the source is done and nothing is in flight or waiting,
        or when the run drained."""
        # structlog's lazy proxy assembles a new logger on every call; one per run is enough
        # (the CLI configures logging before the run, capture_logs wraps it in tests).
        self._log = log.bind()
        try:
            async with asyncio.TaskGroup() as tg:
                ticker = tg.create_task(self._tick())
                self._dispatcher = tg.create_task(self._dispatch(source, tg))
                self.controls.on_drain(self._stop_dispatcher)
                await self._dispatcher
                while self._in_flight:
                    await asyncio.wait(set(self._in_flight))
                ticker.cancel()
        except BaseExceptionGroup as group:
            raise_first(group, LedgerWriteError)
        if self.failure is not None:
            raise self.failure
        return self.tally

    def _drained(self) -> bool:
        # A call, not the property: the awaits above may have drained the run, and a type
        # checker that narrowed `controls.draining` at the loop's head would not see it.
        return self.controls.draining

    def _stop_dispatcher(self) -> None:
        # The dispatcher may drain the run itself (the limiter is gone): it then stops on its
        # own; cancelling the running task would end it cancelled instead of finished.
        dispatcher = self._dispatcher
        if (
            dispatcher is not None
            and not dispatcher.done()
            and dispatcher is not asyncio.current_task()
        ):
            dispatcher.cancel()

    async def _dispatch(self, source: Iterator[Work | Result], tg: asyncio.TaskGroup) -> None:
        held: Work | None = None
        try:
            while not self.controls.draining:
                now = self.clock()
                if self._heap and self._heap[0][0] <= now:
                    held = heapq.heappop(self._heap)[2]
                else:
                    item = next(source, None)
                    if isinstance(item, Result):
                        self._record(item)
                        continue
                    if item is None:
                        if not self._heap and not self._in_flight:
                            return
                        await self._idle(self._heap[0][0] - now if self._heap else None)
                        continue
                    held = item
                    held.started = stamp(self.wall())
                    held.deadline = now + self.settings.retry.item_deadline_s
                while len(self._in_flight) >= self.concurrency.limit:
                    wait = self._until_room()
                    if len(self._in_flight) < self.concurrency.limit:
                        break
                    await self._idle(wait)
                try:
                    await self.pacer.acquire()
                except LimiterUnavailable as exc:
                    # Never fall back to a private budget: stop taking work, let what is on
                    # the wire finish, and end the run (exit 3).
                    self._fail(exc, StopReason.LIMITER)
                    break
                if self._drained():
                    break  # drained meanwhile, by this very task (the source, the limiter)
                task = tg.create_task(self._attempt(held))
                self._in_flight[task] = self.clock()
                task.add_done_callback(self._landed)
                held = None
        except asyncio.CancelledError:
            if not self.controls.draining:
                raise  # cancelled from outside: the whole run is being torn down
            me = asyncio.current_task()
            if me is not None:
                me.uncancel()
        finally:
            # What waited when the run stopped: deferred if it was sent before, else pending.
            if held is not None and held.sends:
                self._finish(held, Outcome.DEFERRED, held.last)
            while self._heap:
                waiting = heapq.heappop(self._heap)[2]
                self._finish(waiting, Outcome.DEFERRED, waiting.last)

    def _until_room(self) -> float | None:
        """At the limit: let the oldest request's age raise the latency estimate, and say in
        how many seconds that age alone makes room (None: only an answer can, at the cap)."""
        age = self.clock() - next(iter(self._in_flight.values()))
        self.concurrency.waiting(age)
        need = self.concurrency.latency_for(len(self._in_flight))
        # At least 1 ms: a wake-up exactly on the boundary must not spin.
        return None if need is None else max(need - age, 0.001)

    async def _idle(self, timeout: float | None) -> None:
        """Wait until a request lands, or `timeout` seconds (a retry falls due, the oldest
        request grows old enough to raise the limit)."""
        self._wake.clear()
        if timeout is None:
            await self._wake.wait()
            return
        # One task, not two under asyncio.wait: at the limit this runs once per request.
        sleeper = asyncio.ensure_future(self.sleep(max(0.0, timeout)))
        sleeper.add_done_callback(self._wake_up)
        try:
            await self._wake.wait()
        finally:
            sleeper.remove_done_callback(self._wake_up)
            sleeper.cancel()

    def _wake_up(self, _: asyncio.Future[None]) -> None:
        self._wake.set()

    def _landed(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)
        self._wake.set()

    async def _attempt(self, work: Work) -> None:
        """One send of `work`: its intent, the request, and what the verdict makes of it."""
        work.sends += 1
        self.controls.writes_started = True
        now = self.wall()  # one reading for the intent and the signature: microseconds apart
        if self.ledger is not None:
            self.ledger.append(intent_of(work, run_id=self.run_id, at=stamp(now)))
        self.sent_writes += 1
        if self.metrics is not None:
            self.metrics.in_flight(1)
        try:
            verdict = await self._send(_ACTION_NAMES[work.action], work.body, now)
        finally:
            if self.metrics is not None:
                self.metrics.in_flight(-1)
        work.last = verdict.answer
        self._after(work, verdict)

    def _after(self, work: Work, verdict: Verdict) -> None:
        """Finish `work`, stop the run, or put it on the retry heap. Synchronous: a
        cancellation cannot land between the decision and its record."""
        mono = self.clock()
        step = next_step(
            verdict,
            action=work.action,
            attempts=work.attempts,
            policy=self.settings.retry,
            rng=self.rng,
            now=mono,
            deadline=work.deadline,
        )
        match step:
            case Finish():
                self._finish(work, step.outcome, step.answer)
            case Stop():
                self._fail(
                    RunAborted(step.answer.code, step.answer.message, step.hint), StopReason.ABORTED
                )
                self._finish(work, Outcome.DEFERRED, step.answer)
            case Wait():
                if step.counts:
                    work.attempts += 1
                    self.tally.retries += 1
                    if self.metrics is not None:
                        self.metrics.retry()
                if self.controls.draining:
                    self._finish(work, Outcome.DEFERRED, step.answer)
                    return
                log.debug(
                    "group.retry_scheduled",
                    name=work.name,
                    code=step.answer.code,
                    delay_s=round(step.delay_s, 3),
                    attempt=work.sends,
                )
                heapq.heappush(self._heap, (mono + step.delay_s, next(self._seq), work))

    def _fail(self, exc: WorkerError, reason: StopReason) -> None:
        if self.failure is None:
            self.failure = exc
        self.controls.drain(reason)

    def _finish(self, work: Work, outcome: Outcome, answer: Answer | None) -> None:
        """Record the outcome. Synchronous on purpose: no await may split decide and write."""
        finished = stamp(self.wall())
        self._record(result_of(work, outcome, answer, run_id=self.run_id, finished=finished))

    def _record(self, result: Result) -> None:
        if self.ledger is not None:
            self.ledger.append(result)
        self.tally.outcomes[(result.action, result.outcome)] += 1
        if self.metrics is not None:
            self.metrics.item(str(result.action or "none"), str(result.outcome))
        log_result(self._log, result)

    async def _tick(self) -> None:
        while True:
            await self.sleep(FSYNC_EVERY_S)
            if self.ledger is not None:
                await asyncio.to_thread(self.ledger.sync)
            if self.on_tick is not None:
                self.on_tick(self.tally)
