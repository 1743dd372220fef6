"""The runner in-process: a scripted sender, a virtual clock, a list for a ledger.

These prove in milliseconds what the subprocess tests used to prove in seconds: outcomes per
action, retries, ambiguous creates, throttles, stopping, the in-flight cap, a failing ledger.
What needs a real process (signals, kill -9, file locks) stays in the end-to-end suites.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest

from worker.api.signing import Credentials
from worker.api.transport import Failure, Response
from worker.errors import EndpointUnreachable, LedgerWriteError, ListingFailed, RunAborted
from worker.ledger.records import Action, Intent, Outcome, Record, Result, StopReason
from worker.runner.controls import Controls
from worker.runner.dispatch import Runner
from worker.runner.stamps import seconds_between, stamp
from worker.runner.work import Work
from worker.settings import Pacing, RetryPolicy, Settings


def envelope(code: str = "", status: int = 200, result: Any = None) -> Response:
    meta: dict[str, Any] = {"RequestId": "rid"}
    if code:
        meta["Error"] = {"Code": code, "Message": code}
    body: dict[str, Any] = {"ResponseMetadata": meta}
    if result is not None:
        body["Result"] = result
    return Response(status=status, body=orjson.dumps(body))


OK = envelope()


class Clock:
    """Virtual monotonic time: sleeping advances it at once."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    async def sleep(self, delay: float) -> None:
        self.t += max(0.0, delay)
        await asyncio.sleep(0)


class Script:
    """A Sender that answers per Name from a script (then OK), and counts what it saw."""

    def __init__(
        self,
        script: Mapping[str, list[Response | Failure]] | None = None,
        *,
        default: Response | Failure = OK,
        hold: asyncio.Event | None = None,
    ) -> None:
        self.script = {k: deque(v) for k, v in (script or {}).items()}
        self.default = default
        self.hold = hold
        self.sent: list[tuple[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def send(
        self, query: Mapping[str, str], headers: Mapping[str, str], body: bytes
    ) -> Response | Failure:
        assert "Authorization" in headers and headers["X-Content-Sha256"]
        name = orjson.loads(body).get("Name", "")
        self.sent.append((query["Action"], name))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hold is not None:
                await self.hold.wait()
            await asyncio.sleep(0)
        finally:
            self.in_flight -= 1
        queue = self.script.get(name)
        return queue.popleft() if queue else self.default


class Pacer:
    """Admits one request per virtual 1/rate seconds."""

    def __init__(self, clock: Clock, rate: float = 10.0) -> None:
        self.clock = clock
        self.gap = 1.0 / rate
        self.throttles = 0

    async def acquire(self) -> None:
        await self.clock.sleep(self.gap)

    def throttled(self, retry_after_s: float | None = None) -> None:
        self.throttles += 1


class Journal:
    def __init__(self, fail_on: int | None = None) -> None:
        self.records: list[Record] = []
        self.fail_on = fail_on

    def append(self, record: Record) -> None:
        if self.fail_on is not None and len(self.records) >= self.fail_on:
            raise LedgerWriteError("ledger: cannot write the ledger: No space left on device")
        self.records.append(record)

    def sync(self) -> None:
        pass

    def results(self) -> dict[str, Result]:
        return {r.name: r for r in self.records if isinstance(r, Result) and r.name}


def make(
    sender: Script,
    journal: Journal | None = None,
    *,
    concurrency: int | None = None,
    max_attempts: int = 4,
    controls: Controls | None = None,
    clock: Clock | None = None,
) -> Runner:
    settings = Settings(
        manifest=Path("m.jsonl"),
        ledger=Path("m.ledger.jsonl"),
        endpoint="http://127.0.0.1:9",
        pacing=Pacing(rate=10.0),
        retry=RetryPolicy(max_attempts=max_attempts),
        concurrency=concurrency,
    )
    clock = clock or Clock()
    return Runner(
        settings=settings,
        credentials=Credentials(access_key="AK", secret_key="SK"),
        sender=sender,
        pacer=Pacer(clock),
        ledger=journal if journal is not None else Journal(),
        controls=controls or Controls(),
        run_id="r1",
        clock=clock,
        sleep=clock.sleep,
    )


def work(name: str, action: Action = Action.CREATE, line: int = 1) -> Work:
    body = {"Name": name, "ProjectName": "default"} if action is Action.CREATE else {"Name": name}
    return Work(action=action, name=name, line=line, fingerprint="f", body=orjson.dumps(body))


def items(n: int) -> list[Work]:
    return [work(f"G{i}", line=i + 1) for i in range(n)]


def test_every_item_is_created_and_each_intent_precedes_its_result() -> None:
    """Five creates answered OK: five `created` results, each after its own intent."""
    journal = Journal()
    runner = make(Script(), journal)
    tally = asyncio.run(runner.apply(iter(items(5))))
    assert tally.count(Outcome.CREATED) == 5 and tally.requests == 5
    for name in (f"G{i}" for i in range(5)):
        kinds = [type(r) for r in journal.records if getattr(r, "name", None) == name]
        assert kinds == [Intent, Result]


def test_a_retryable_error_is_retried_and_then_created() -> None:
    """InternalError then OK: created after two sends, one retry counted."""
    journal = Journal()
    runner = make(Script({"G0": [envelope("InternalError", 500)]}), journal)
    tally = asyncio.run(runner.apply(iter(items(1))))
    result = journal.results()["G0"]
    assert result.outcome is Outcome.CREATED and result.sends == 2 and tally.retries == 1


def test_an_ambiguous_timeout_then_exist_is_recorded_exists() -> None:
    """A create that timed out and then answers 'already exists' is `exists`: the first
    attempt did it."""
    journal = Journal()
    sender = Script(
        {
            "G0": [
                Failure("timeout", "no answer in time", no_answer=False),
                envelope("RequestLimitExceeded.Exist", 429),
            ]
        }
    )
    asyncio.run(make(sender, journal).apply(iter(items(1))))
    assert journal.results()["G0"].outcome is Outcome.EXISTS


def test_out_of_attempts_is_deferred_with_the_last_answer() -> None:
    """Four 503s with max_attempts 4: deferred, four sends, the last code recorded."""
    journal = Journal()
    sender = Script(default=envelope("ServiceUnavailableTemp", 503))
    tally = asyncio.run(make(sender, journal).apply(iter(items(1))))
    result = journal.results()["G0"]
    assert (result.outcome, result.sends, result.code) == (
        Outcome.DEFERRED,
        4,
        "ServiceUnavailableTemp",
    )
    assert tally.count(Outcome.DEFERRED) == 1


def test_a_throttle_slows_the_pacer_and_uses_no_attempt() -> None:
    """Five FlowLimitExceeded then OK with max_attempts 2: created; the pacer heard of it."""
    journal = Journal()
    sender = Script({"G0": [envelope("FlowLimitExceeded", 429)] * 5})
    runner = make(sender, journal, max_attempts=2)
    tally = asyncio.run(runner.apply(iter(items(1))))
    assert journal.results()["G0"].outcome is Outcome.CREATED
    assert tally.throttles == 5
    assert isinstance(runner.pacer, Pacer) and runner.pacer.throttles == 5


def test_update_and_delete_map_not_found_per_action() -> None:
    """ResourceNotFound: a delete is done (already gone), an update finds the group vanished."""
    journal = Journal()
    nf = envelope("ResourceNotFound", 404)
    sender = Script({"U": [nf], "D": [nf], "D2": [OK]})
    asyncio.run(
        make(sender, journal).apply(
            iter([work("U", Action.UPDATE), work("D", Action.DELETE), work("D2", Action.DELETE)])
        )
    )
    results = journal.results()
    assert results["U"].outcome is Outcome.VANISHED
    assert results["D"].outcome is Outcome.DELETED
    assert results["D2"].outcome is Outcome.DELETED
    assert ("UpdatePullToPushGroup", "U") in sender.sent
    assert ("DeletePullToPushGroup", "D") in sender.sent


def test_results_from_the_source_are_recorded_without_a_request() -> None:
    """An invalid line or a conflict comes as a Result: it is recorded and nothing is sent."""
    journal = Journal()
    sender = Script()
    conflict = Result(
        run_id="r1",
        action=None,
        name="X",
        outcome=Outcome.CONFLICT,
        status=None,
        code="ProjectConflict",
        message="m",
        request_id="",
        sends=0,
        fingerprint=None,
        line=3,
        started="s",
        finished="f",
    )
    tally = asyncio.run(make(sender, journal).apply(iter([conflict])))
    assert sender.sent == [] and journal.records == [conflict]
    assert tally.count(Outcome.CONFLICT) == 1


def test_a_refused_run_stops_and_the_item_is_deferred_not_rejected() -> None:
    """SignatureDoesNotMatch stops the run (RunAborted, exit 7); the item that got it is
    `deferred` (resent next time), never `rejected`; far fewer than all items were sent."""
    journal = Journal()
    sender = Script(default=envelope("SignatureDoesNotMatch", 401))
    runner = make(sender, journal, concurrency=2)
    with pytest.raises(RunAborted) as caught:
        asyncio.run(runner.apply(iter(items(50))))
    assert caught.value.exit_code == 7
    assert runner.controls.reason is StopReason.ABORTED
    outcomes = {r.outcome for r in journal.results().values()}
    assert outcomes == {Outcome.DEFERRED}
    assert len(sender.sent) <= 4


def test_an_endpoint_that_never_answers_ends_the_run_early() -> None:
    """Only connection failures (no HTTP answer) for 30 s of tries: EndpointUnreachable
    (exit 3) long before every item used its attempts; items sent are deferred."""
    journal = Journal()
    sender = Script(default=Failure("refused", "connection refused", no_answer=True))
    runner = make(sender, journal, max_attempts=8)
    with pytest.raises(EndpointUnreachable) as caught:
        asyncio.run(runner.apply(iter(items(1000))))
    assert caught.value.exit_code == 3
    assert len(sender.sent) < 1000
    assert {r.outcome for r in journal.results().values()} == {Outcome.DEFERRED}


def test_any_http_answer_resets_the_unreachable_count() -> None:
    """Alternating refusals and 503s never look unreachable: the 503 is an answer."""
    journal = Journal()
    flaky: list[Response | Failure] = [
        Failure("refused", "refused", no_answer=True),
        envelope("X", 503),
    ] * 3
    sender = Script({f"G{i}": list(flaky) for i in range(20)})
    tally = asyncio.run(make(sender, journal, max_attempts=10).apply(iter(items(20))))
    assert tally.count(Outcome.CREATED) == 20


def test_draining_defers_waiting_retries_and_leaves_unsent_items_pending() -> None:
    """drain() while an item waits for its retry: that item is deferred; items never sent get
    no result at all (they stay pending for the next run); apply returns normally."""
    journal = Journal()
    controls = Controls()
    clock = Clock()
    sender = Script({"G0": [envelope("InternalError", 500)] * 5})
    runner = make(sender, journal, controls=controls, clock=clock, concurrency=1)

    def source() -> Any:
        yield work("G0")
        controls.drain(StopReason.SIGNAL)  # stops while G0 waits to be retried
        yield from items(5)[1:]

    tally = asyncio.run(runner.apply(source()))
    results = journal.results()
    assert results["G0"].outcome is Outcome.DEFERRED
    assert set(results) == {"G0"} and tally.finished == 1


def test_in_flight_requests_never_exceed_the_cap() -> None:
    """With --concurrency 3 and a server that holds every answer, at most 3 are in flight."""

    async def scenario() -> Script:
        hold = asyncio.Event()
        sender = Script(hold=hold)
        runner = make(sender, concurrency=3)
        task = asyncio.ensure_future(runner.apply(iter(items(20))))
        for _ in range(50):
            await asyncio.sleep(0)
        assert sender.in_flight == 3
        hold.set()
        await task
        return sender

    sender = asyncio.run(scenario())
    assert sender.max_in_flight == 3 and len(sender.sent) == 20


def test_adaptive_limit_grows_with_latency_and_stays_under_the_cap() -> None:
    """The in-flight limit follows rate x latency, and never passes the cap."""
    runner = make(Script(), concurrency=40)
    limits = []
    for latency in (0.05, 1.0, 3.0, 100.0):
        runner.concurrency.observe(latency)
        limits.append(runner.concurrency.limit)
    assert limits == sorted(limits) and limits[0] < limits[2] and limits[-1] == 40


def test_requests_out_longer_than_assumed_raise_the_limit_up_to_the_cap() -> None:
    """A server that has not answered yet (2-4 s) does not starve the rate at the start
    limit: the age of the oldest request raises it, and never above --concurrency."""

    async def scenario() -> tuple[Script, int]:
        hold = asyncio.Event()
        sender = Script(hold=hold)
        runner = make(sender, concurrency=40)
        start = runner.concurrency.limit  # 10/s x 0.5 s assumed x 1.5 + 1
        task = asyncio.ensure_future(runner.apply(iter(items(60))))
        for _ in range(400):  # virtual time passes as the dispatcher waits; no answer comes
            await asyncio.sleep(0)
        assert sender.in_flight == 40 > start
        hold.set()
        await task
        return sender, start

    sender, start = asyncio.run(scenario())
    assert sender.max_in_flight == 40 and len(sender.sent) == 60 and start < 40


def test_latency_for_is_where_the_limit_passes_the_count() -> None:
    """latency_for(n) is the boundary: just above it the limit exceeds n; at the cap, None."""
    runner = make(Script(), concurrency=30)
    c = runner.concurrency
    for n in (2, 9, 20, 29):
        need = c.latency_for(n)
        assert need is not None
        c.latency_s = need + 1e-9
        assert c.limit > n
        c.latency_s = need
        assert c.limit <= n or n < 2
    assert c.latency_for(30) is None
    c.waiting(100.0)
    assert c.latency_s == 100.0 and c.limit == 30
    c.waiting(1.0)  # a younger request says nothing new
    assert c.latency_s == 100.0


def test_a_ledger_that_cannot_write_the_intent_sends_nothing_more() -> None:
    """The intent write fails (disk full): that request is not sent, the run stops with
    LedgerWriteError (exit 7)."""
    journal = Journal(fail_on=2)  # two records fit: the first intent and its result
    sender = Script()
    with pytest.raises(LedgerWriteError) as caught:
        asyncio.run(make(sender, journal, concurrency=1).apply(iter(items(3))))
    assert caught.value.exit_code == 7
    assert sender.sent == [("CreatePullToPushGroup", "G0")]


def test_reads_are_retried_and_return_the_result() -> None:
    """A List read retries an InternalError and returns the answer's Result."""
    sender = Script(
        {"": [envelope("InternalError", 500), envelope(result={"List": [], "Total": 0})]}
    )
    runner = make(sender)
    result = asyncio.run(runner.read("ListPullToPushGroup", b'{"PageNum":1}'))
    assert result == {"List": [], "Total": 0} and runner.tally.requests == 2


def test_group_events_carry_the_bound_run_id_and_a_duration() -> None:
    """Each finished item logs one `group.<outcome>` event with its action and duration, and
    carries the run id bound once in the context (structlog's capture_logs, not stderr)."""
    import structlog
    from structlog.testing import capture_logs

    # Another test in this process may have configured a level filter (-q); start clean.
    structlog.reset_defaults()
    structlog.contextvars.bind_contextvars(run_id="r1")
    try:
        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as events:
            asyncio.run(make(Script({"G1": [envelope("InvalidParam", 400)]})).apply(iter(items(2))))
    finally:
        structlog.contextvars.unbind_contextvars("run_id")
    finished = [e for e in events if e["event"].startswith("group.")]
    assert sorted(e["event"] for e in finished) == ["group.created", "group.rejected"]
    assert all(e["run_id"] == "r1" and e["action"] == "create" for e in finished)
    assert all(isinstance(e["duration_s"], float) for e in finished)
    rejected = next(e for e in finished if e["event"] == "group.rejected")
    assert rejected["code"] == "InvalidParam" and rejected["log_level"] == "warning"


def test_a_refused_read_stops_the_run_instead_of_retrying_later() -> None:
    """A List answered InvalidParam is a refusal no later run changes: RunAborted (exit 7),
    after one request, not 'listing incomplete, run again' (3)."""
    sender = Script({"": [envelope("InvalidParam", 400)]})
    runner = make(sender)
    with pytest.raises(RunAborted) as caught:
        asyncio.run(runner.read("ListPullToPushGroup", b'{"PageNum":1}'))
    assert caught.value.exit_code == 7 and runner.tally.requests == 1


def test_a_read_out_of_attempts_fails_the_listing_after_max_attempts_sends() -> None:
    """A List answered 503 every time, max_attempts 3: ListingFailed (exit 3) after exactly
    three requests, two of them retries; nothing was changed."""
    sender = Script({"": [envelope("ServiceUnavailableTemp", 503)] * 10})
    runner = make(sender, max_attempts=3)
    with pytest.raises(ListingFailed) as caught:
        asyncio.run(runner.read("ListPullToPushGroup", b'{"PageNum":1}'))
    assert caught.value.exit_code == 3 and "nothing was changed" in str(caught.value)
    assert runner.tally.requests == 3 and runner.tally.retries == 2


def test_a_throttled_read_uses_no_attempt() -> None:
    """Five FlowLimitExceeded then a page, max_attempts 2: the read returns the page; the
    throttles slowed the pacer and used up no attempt, as for writes."""
    page = {"List": [], "Total": 0}
    answers: list[Response | Failure] = [envelope("FlowLimitExceeded", 429)] * 5
    sender = Script({"": [*answers, envelope(result=page)]})
    runner = make(sender, max_attempts=2)
    assert asyncio.run(runner.read("ListPullToPushGroup", b'{"PageNum":1}')) == page
    assert runner.tally.throttles == 5 and runner.tally.retries == 0


def test_a_read_answered_ok_without_a_result_is_refused() -> None:
    """An OK envelope without a Result object cannot be used as a page: RunAborted (exit 7)
    after one request, as before the read went through retry.next_step."""
    runner = make(Script({"": [OK]}))
    with pytest.raises(RunAborted) as caught:
        asyncio.run(runner.read("ListPullToPushGroup", b'{"PageNum":1}'))
    assert caught.value.exit_code == 7 and runner.tally.requests == 1
    assert "HTTP200" in str(caught.value)


def test_stamps_read_back_as_the_seconds_between_them() -> None:
    """seconds_between inverts stamp to the millisecond; a value that is no stamp is None."""
    from datetime import UTC, datetime, timedelta

    t = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    later = t + timedelta(seconds=1, milliseconds=250)
    assert stamp(t) == "2024-05-01T12:00:00.000Z"
    assert seconds_between(stamp(t), stamp(later)) == 1.25
    assert seconds_between("", stamp(later)) is None
