"""The session: one sending command (`run`, `sync`, `export`), resolved once, and the one
function that opens and closes what its work runs on.

`Session` is built once by the CLI: the settings, the command's options, the controls a
signal drains, how to run a coroutine under the signal handlers, and `Hooks` (the clocks,
the sleep, the ledger class and the time windows: `connect.HOOKS`, the real ones unless a
test replaces them). `carry_out` loads the keys, opens the ledger (for work that records),
the account (the endpoint, or the embedded sandbox), the rate budget, the transport, the
runner and the run's metrics, runs the command's work on them (`Opened`) and closes them in
reverse. `Opened.record` frames a recorded run (header, work, footer) and is where an
outcome becomes an exit code (`outcome_exit`); every error's code is its class's (cli.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import IO, Any, Literal, Protocol

import structlog

from worker import __version__, connect
from worker.api.signing import Credentials
from worker.connect import Hooks, account_for, load_credentials, runner_for, target_of
from worker.errors import Exit, LedgerError, LedgerWriteError, WorkerError
from worker.ledger.journal import Ledger
from worker.ledger.lock import Holder
from worker.ledger.prebuild import Prebuild
from worker.ledger.records import Footer, Outcome, Result, RunHeader, StopReason, Target
from worker.manifest.load import manifest_name, remember_manifest
from worker.manifest.values import Invalid, Scan
from worker.plan import run_plan
from worker.progress import Progress
from worker.published import Published
from worker.runner.controls import Controls
from worker.runner.dispatch import Runner
from worker.runner.stamps import stamp
from worker.runner.tally import Tally
from worker.settings import CommandOptions, Settings

log = structlog.get_logger("worker")


class UnderSignals(Protocol):
    """Runs a coroutine to its end under the process's signal handling (signals.py)."""

    def __call__(self, main: Coroutine[Any, Any, Exit], controls: Controls) -> Exit: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Session:
    """One sending command, resolved once from the command line, job file and environment."""

    command: Literal["run", "sync", "export"]  # the header's and the metrics' word for it
    settings: Settings
    options: CommandOptions
    controls: Controls
    under_signals: UnderSignals
    out: IO[str]
    hooks: Hooks = field(default_factory=lambda: connect.HOOKS)  # read late: tests patch it


@dataclass(frozen=True, slots=True)
class Opened:
    """What a command's work runs on, open for as long as the work lasts."""

    session: Session
    runner: Runner
    target: Target
    ledger: Ledger | None  # None: the work records nothing (export, a dry run, --check)
    published: Published | None  # the run's metrics: run and sync (not export)
    source: str  # where the keys came from (never the secret)

    @property
    def settings(self) -> Settings:
        return self.runner.settings

    def header(self, scan: Scan, plan: dict[str, int]) -> RunHeader:
        command = self.session.command
        assert command != "export", "export records nothing"
        return RunHeader(
            run_id=self.runner.run_id,
            started=stamp(self.runner.wall()),
            version=__version__,
            command=command,
            target=self.target,
            manifest=manifest_name(scan.path),
            manifest_sha256=scan.sha256,
            items=scan.groups + scan.invalid,
            plan=plan,
            settings=self.settings.public(),
        )

    async def record(
        self, header: RunHeader, work: Coroutine[Any, Any, Tally], progress: Progress
    ) -> Exit:
        """Write the header, do the work, and always write the footer (unless killed)."""
        assert self.ledger is not None and self.published is not None
        published, rate = self.published, self.settings.pacing.rate

        def tick(tally: Tally) -> None:
            progress.tick(tally)
            published.tick(tally, rate)

        self.runner.on_tick = tick
        try:
            return await _recorded(self.runner, self.ledger, header, work, published, progress)
        finally:
            progress.close(self.runner.tally)


Work = Callable[[Opened], Coroutine[Any, Any, Exit]]


def invalid_line(runner: Runner, item: Invalid) -> Result:
    """The result of an invalid manifest line (--skip-invalid): recorded, never sent."""
    return unsent(
        runner, item.name, item.line, Outcome.INVALID, "InvalidManifestLine", str(item.problem)
    )


def unsent(
    runner: Runner,
    name: str | None,
    line: int,
    outcome: Outcome,
    code: str,
    message: str,
    fingerprint: str | None = None,
) -> Result:
    """The result of a line that is not sent (invalid, in conflict): now, no request."""
    now = stamp(runner.wall())
    return Result(
        run_id=runner.run_id,
        action=None,
        name=name,
        outcome=outcome,
        status=None,
        code=code,
        message=message,
        request_id="",
        sends=0,
        fingerprint=fingerprint,  # a conflict's: `report` tells whether it changed since
        line=line,
        started=now,
        finished=now,
    )


def carry_out(
    session: Session, work: Work, *, recorded: Scan | None = None, prebuilt: Prebuild | None = None
) -> Exit:
    """Open what `work` runs on, run it under the signal handlers, close everything.
    `recorded`: the manifest of work that records (the ledger is opened, the scan kept);
    `prebuilt`: the ledger's index being rebuilt by another process (prebuild.py)."""
    settings, creds, source = load_credentials(session.settings, session.options)
    target = target_of(settings, creds, session.options)
    if recorded is None:
        main = _opened(session, settings, creds, target, None, source, work)
        return session.under_signals(main, session.controls)
    ledger_class = session.hooks.ledger
    holder = Holder.this_process(
        f"worker {session.command} {manifest_name(recorded.path)}", stamp(session.hooks.wall())
    )
    with ledger_class.open(
        settings.ledger,
        target=target,
        expect_names=recorded.groups,
        clock=session.hooks.clock,
        holder=holder,
        prebuilt=prebuilt,
    ) as book:
        remember_manifest(recorded, settings.ledger)
        main = _opened(session, settings, creds, target, book, source, work)
        return session.under_signals(main, session.controls)


async def _opened(
    session: Session,
    settings: Settings,
    creds: Credentials | None,
    target: Target,
    book: Ledger | None,
    source: str,
    work: Work,
) -> Exit:
    run_id = uuid.uuid4().hex
    published = None
    if book is not None:
        structlog.contextvars.bind_contextvars(run_id=run_id)
    if session.command != "export":  # a sync --check's plan is a metric too
        published = Published(session.options, session.command, settings.pacing.rate)
        published.write()  # the textfile exists from the start, not from the first tick
    async with contextlib.AsyncExitStack() as stack:
        if published is not None:
            stack.enter_context(published.serving())
        account = await stack.enter_async_context(
            account_for(settings, creds, target, session.options)
        )
        runner = await stack.enter_async_context(
            runner_for(
                account,
                hooks=session.hooks,
                book=book,
                controls=session.controls,
                run_id=run_id,
                metrics=published.metrics if published is not None else None,
                lists=session.command != "run",  # create-only runs read no List pages
            )
        )
        try:
            return await work(Opened(session, runner, target, book, published, source))
        finally:
            if book is None and published is not None:
                published.looked()  # a recorded run's last word is in _finish
    raise AssertionError("unreachable")  # mypy: the exit stack may swallow an exception


# -- a recorded run and its exit code -------------------------------------------------------


def outcome_exit(tally: Tally, controls: Controls, *, command: str = "run") -> Exit:
    """How a run that was not stopped by a failure ends, for the exit code and the footer.

    For `sync`, "already exists", "vanished" and "deferred" are not the end of the story:
    its rounds (commands/sync_rounds.py) list again and carry out what is still different,
    and raise StillDifferent (exit 3) if a difference remains. For `run`, "exists" is done
    (create does not update, by design), but a line skipped because its group holds other
    content (run_plan.DRIFT) is drift, 6: a fix-the-line 1 and a run-again 3 outrank it."""
    if controls.reason is StopReason.SIGNAL:
        return Exit.INTERRUPTED
    # A rerun that skips unchanged rejected lines still has not done what the manifest asks.
    if (
        tally.count(Outcome.REJECTED)
        or tally.count(Outcome.INVALID)
        or tally.count(Outcome.CONFLICT)
        or tally.skipped["rejected_unchanged"]
    ):
        return Exit.REJECTED
    if command == "sync":
        return Exit.OK
    if tally.count(Outcome.DEFERRED) or tally.count(Outcome.VANISHED):
        return Exit.RETRY_LATER
    # A line whose group exists with other content: `run` cannot make it true (drift).
    if any(tally.skipped[why] for why in run_plan.DRIFT):
        return Exit.DRIFT
    return Exit.OK


def dry_run_exit(counts: Counter[str]) -> Exit:
    """`run --dry-run`: the exit the run would end with if every send succeeded, by the
    same precedence as `outcome_exit` (1 over 6; 3 cannot be foreseen)."""
    if counts["invalid"] or counts["rejected_unchanged"]:
        return Exit.REJECTED
    if any(counts[why] for why in run_plan.DRIFT):
        return Exit.DRIFT
    return Exit.OK


def check_exit(in_sync: bool) -> Exit:
    """`sync --check`: 0 when the account matches the manifest, else the drift alarm (6)."""
    return Exit.OK if in_sync else Exit.DRIFT


async def _recorded(
    runner: Runner,
    book: Ledger,
    header: RunHeader,
    work: Coroutine[Any, Any, Tally],
    published: Published,
    progress: Progress,
) -> Exit:
    try:
        book.append(header)
    except LedgerWriteError as exc:
        work.close()
        raise LedgerError(f"{exc}; nothing was sent") from None  # exit 2: nothing went out
    code: Exit = Exit.INTERNAL
    try:
        await work
        code = outcome_exit(runner.tally, runner.controls, command=header.command)
    except LedgerWriteError as exc:
        if runner.tally.requests == 0:
            code = Exit.USAGE
            raise LedgerError(f"{exc}; nothing was sent") from None
        code = exc.exit_code
        raise
    except WorkerError as exc:
        code = exc.exit_code
        raise
    except asyncio.CancelledError:
        code = Exit.INTERRUPTED
        raise
    finally:
        progress.close(runner.tally)  # the bar's last state, then the summary below it
        _finish(runner, book, published, code)
    return code


def _finish(runner: Runner, book: Ledger, published: Published, code: Exit) -> None:
    """The footer, the metrics' last word and the summary line."""
    tally = runner.tally
    elapsed = max(1e-9, runner.clock() - tally.started)
    reason = runner.controls.reason
    if reason is None and code is Exit.INTERNAL:
        reason = StopReason.ERROR
    with contextlib.suppress(Exception):  # a broken ledger already said why
        book.append(
            Footer(
                run_id=runner.run_id,
                finished=stamp(runner.wall()),
                stopped_by=reason,
                exit_code=int(code),
                outcomes=tally.by_key(),
                skipped=dict(tally.skipped),
                codes=dict(tally.codes),
                requests=tally.requests,
                throttles=tally.throttles,
                retries=tally.retries,
                duration_s=round(elapsed, 3),
                rate_limit=runner.settings.pacing.rate,
                rate_achieved=round(tally.rate, 3),
            )
        )
    published.finish(tally, runner.settings.pacing.rate, elapsed, code)
    log.info(
        "run.summary",
        exit_code=int(code),
        requests=tally.requests,
        rate_achieved=round(tally.rate, 3),
        throttles=tally.throttles,
        retries=tally.retries,
        skipped=sum(tally.skipped.values()),
        **tally.by_key(),
    )
