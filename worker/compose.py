"""Composition root: the pieces every command is built from, opened and closed in one place.

The credentials or the embedded sandbox, the ledger of one target, the rate budget, the
transport and a Runner on them; the journal that frames a run (header, work, footer) and
turns what happened into an exit code; the run's metrics. `worker/commands/` composes these
into `run`, `sync` and `export`. Nothing here knows arguments or signals: the CLI passes
`Controls` in and runs the coroutines under its signal handlers (`Loop`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import structlog

from worker.api import credentials
from worker.api.signing import Credentials
from worker.api.transport import MAX_BODY_BYTES, Reachability, Transport
from worker.errors import (
    Exit,
    LedgerError,
    LedgerWriteError,
    SpoolError,
    UsageError,
    WorkerError,
)
from worker.ledger.journal import Ledger
from worker.ledger.records import Footer, Outcome, RunHeader, StopReason, Target
from worker.manifest import source
from worker.manifest.remembered import recall, remember, remembered_path
from worker.manifest.values import Scan
from worker.metrics import Metrics
from worker.pacing.budget import Pacer
from worker.pacing.local import LocalPacer
from worker.progress import Progress
from worker.runner.concurrency import machine_cap
from worker.runner.controls import Controls
from worker.runner.dispatch import Runner
from worker.runner.stamps import stamp, utcnow
from worker.runner.tally import Tally
from worker.settings import Settings, redact_url

log = structlog.get_logger("worker")


# A List page of 1000 groups with their tags can pass the transport's 1 MiB default.
LIST_BODY_BYTES = 16 << 20


class Loop(Protocol):
    """Runs a coroutine to its end under the process's signal handling (the CLI's)."""

    def __call__(self, main: Coroutine[Any, Any, Exit], controls: Controls) -> Exit: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """What a command adds to Settings: where the account is and how to report."""

    sandbox_account: Path | None = None  # --sandbox: the embedded account's state file
    profile: str | None = None
    retry_rejected: bool = False
    json: bool = False
    job_name: str = ""  # the job file's stem, else the manifest's: the metrics' job_name
    metrics_file: Path | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"


class Published:
    """The run's metrics and where they go: a textfile every tick and at the end, and
    /metrics while the run lasts. A metrics file that cannot be written never stops a run."""

    def __init__(self, options: Options, command: str, rate_limit: float) -> None:
        self.metrics = Metrics(command=command, job_name=options.job_name, started_at=time.time())
        self.metrics.rates(rate_limit, 0.0)  # a scrape before the first tick reads --rate
        self._file = options.metrics_file
        self._port = options.metrics_port
        self._host = options.metrics_host
        self._warned = False

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        if self._port is None:
            yield
            return
        with self.metrics.serve(self._port, self._host) as url:
            log.info("metrics.serving", url=url)
            yield

    def tick(self, tally: Tally, rate_limit: float) -> None:
        self.metrics.rates(rate_limit, tally.rate)
        self.write()

    def finish(self, tally: Tally, rate_limit: float, duration_s: float, code: Exit) -> None:
        self.metrics.rates(rate_limit, tally.rate)
        self.metrics.finish(duration_s, success=code is Exit.OK, now=time.time())
        self.write()

    def write(self) -> None:
        if self._file is None:
            return
        try:
            self.metrics.write_textfile(self._file)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("metrics.unwritable", path=str(self._file), error=exc.strerror)


def default_ledger(manifest: Path, *, sandbox: bool) -> Path:
    """groups.jsonl -> groups.ledger.jsonl beside it; with --sandbox groups.sandbox.ledger.jsonl,
    so that a sandbox run never writes the ledger a real run would use by default."""
    name = manifest.name
    stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
    return manifest.with_name(f"{stem}{'.sandbox' if sandbox else ''}.ledger.jsonl")


def sandbox_account_for(ledger_path: Path) -> Path:
    """The embedded sandbox's account file that goes with a ledger: beside it."""
    name = ledger_path.name
    stem = name[: -len(".ledger.jsonl")] if name.endswith(".ledger.jsonl") else name
    return ledger_path.with_name(f"{stem}.account.json")


# -- the pieces ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Account:
    """Where requests go and as whom: the settings (endpoint filled in), keys, target."""

    settings: Settings
    credentials: Credentials
    target: Target


def target_of(settings: Settings, creds: Credentials | None, options: Options) -> Target:
    if options.sandbox_account is not None:
        return Target(
            endpoint=f"sandbox:{options.sandbox_account.resolve()}",
            region=settings.region,
            access_key="sandbox",
        )
    assert creds is not None
    return Target(
        endpoint=redact_url(settings.endpoint), region=settings.region, access_key=creds.access_key
    )


def load_credentials(
    settings: Settings, options: Options
) -> tuple[Settings, Credentials | None, str]:
    """The keys to sign with and where they came from (never the secret).

    A region the source names (a `ve` profile's, VOLCENGINE_REGION) is not applied: the Live
    API signs in cn-north-1 whatever region a profile was made for, and a profile's
    cn-beijing would fail every request. It is only reported when it differs."""
    if options.sandbox_account is not None:
        return settings, None, "the embedded sandbox's keys"
    loaded = credentials.load(os.environ, Path.home(), profile=options.profile)
    if loaded.region and loaded.region != settings.region:
        log.warning(
            "credentials.region_ignored",
            source=loaded.source,
            source_region=loaded.region,
            region=settings.region,
            hint="the Live API signs in --region (default cn-north-1)",
        )
    return settings, loaded.credentials, loaded.source


@contextlib.asynccontextmanager
async def account_for(
    settings: Settings, creds: Credentials | None, target: Target, options: Options
) -> AsyncIterator[Account]:
    """The real endpoint with the user's keys, or the embedded sandbox (--sandbox)."""
    if options.sandbox_account is None:
        assert creds is not None
        yield Account(settings, creds, target)
        return
    from worker import sandbox  # only --sandbox pays for the server

    config = sandbox.SandboxConfig(
        rate=int(settings.pacing.rate), state_file=options.sandbox_account
    )
    finished = False
    try:
        async with sandbox.serve(config) as sb:
            ak, sk = next(iter(sb.keys.items()))
            log.info("sandbox.started", url=sb.url, account=str(options.sandbox_account))
            yield Account(
                replace(settings, endpoint=sb.url),
                Credentials(access_key=ak, secret_key=sk),
                target,
            )
            finished = True
    except UsageError as exc:
        if not finished:
            raise  # a bad account file at start: nothing was sent
        # Saving the account failed after requests went out: not "nothing was sent".
        raise LedgerWriteError(f"the sandbox account was not saved: {exc}") from None


@contextlib.asynccontextmanager
async def _pacer(settings: Settings, creds: Credentials) -> AsyncIterator[Pacer]:
    """The in-process budget, or the one shared through Redis (--limiter)."""
    if not settings.limiter_url:
        yield LocalPacer(settings.pacing)
        return
    from worker.pacing.shared import RedisPacer  # only runs with --limiter pay for redis-py

    async with RedisPacer(
        settings.limiter_url,
        pacing=settings.pacing,
        access_key=creds.access_key,
        region=settings.region,
        timeout_s=settings.limiter_timeout_s,
    ) as shared:
        log.info("limiter.shared", limiter=redact_url(settings.limiter_url))
        yield shared


@contextlib.asynccontextmanager
async def runner_for(
    account: Account,
    *,
    book: Ledger | None,
    controls: Controls,
    run_id: str,
    metrics: Metrics | None = None,
    lists: bool = True,
) -> AsyncIterator[Runner]:
    """A runner on the account. `lists`: it reads List pages, whose answers can be large;
    create-only runs keep the transport's 1 MiB bound on every answer."""
    settings = account.settings
    async with (
        _pacer(settings, account.credentials) as pacer,
        Transport(
            settings.endpoint,
            timeout_s=settings.timeout_s,
            max_connections=machine_cap(settings.concurrency),
            max_body_bytes=LIST_BODY_BYTES if lists else MAX_BODY_BYTES,
        ) as transport,
    ):
        yield Runner(
            settings=settings,
            credentials=account.credentials,
            sender=transport,
            pacer=pacer,
            ledger=book,
            controls=controls,
            run_id=run_id,
            wall=wall_clock(),
            metrics=metrics,
            reachability=_reachability(),
        )


def _reachability() -> Reachability:
    """WORKER_TEST_UNREACHABLE_S: a test hook that shortens the 30 s an endpoint may stay
    silent before the run gives up (each test of it would otherwise take half a minute)."""
    hook = os.environ.get("WORKER_TEST_UNREACHABLE_S")
    return Reachability(window_s=float(hook)) if hook else Reachability()


def wall_clock() -> Callable[[], Any]:
    """UTC now, shifted by WORKER_TEST_CLOCK_OFFSET_S: a test hook that plays a host whose
    clock is off. Nothing in the rate budget reads this clock; X-Date and ledger times do."""
    offset = float(os.environ.get("WORKER_TEST_CLOCK_OFFSET_S", "0") or 0)
    if not offset:
        return utcnow
    return lambda: utcnow() + timedelta(seconds=offset)


def open_ledger(path: Path, target: Target, *, expect_names: int = 0) -> Ledger:
    torn = float(os.environ.get("WORKER_TEST_TORN_WRITES_S", "0") or 0)
    return Ledger.open(path, target=target, torn_writes_s=torn, expect_names=expect_names)


def scan_manifest(settings: Settings) -> Scan:
    """The manifest, validated: remembered from an earlier run against this ledger when its
    bytes are the same (recall), else scanned now (spool beside the ledger)."""
    remembered = remembered_path(settings.ledger)
    recalled = recall(settings.manifest, remembered)
    if recalled is not None:
        log.info("manifest.unchanged", manifest=str(settings.manifest), sha256=recalled.sha256)
        return recalled
    # The spool goes beside the ledger (not a small /tmp); a dry run or a check may look at
    # a ledger in a folder it cannot write, and then uses the temporary directory.
    folder = settings.ledger.parent
    writable = os.access(folder, os.W_OK | os.X_OK)
    return source.scan(settings.manifest, spool_dir=folder if writable else None)


def remember_manifest(scan: Scan, settings: Settings) -> None:
    """Keep the validated spool for the next run (best effort; called with the ledger's
    lock held, so two runs never write it at once)."""
    kept = remembered_path(settings.ledger)
    if (why := remember(scan, kept)) is not None:
        # Not an error: the next run validates the manifest again, that is all.
        log.info("manifest.not_remembered", spool=str(kept), reason=why)


@contextlib.contextmanager
def before_writes() -> Iterator[None]:
    """A spool that cannot be read back before any write was sent: exit 2, not 7."""
    try:
        yield
    except SpoolError as exc:
        raise LedgerError(f"{exc}; nothing was changed") from None


def manifest_name(path: Path) -> str:
    """The manifest as the header records it: absolute for a regular file, so that `report`
    finds it from any folder; as given for a pipe (there is nothing to find again)."""
    return str(path.resolve()) if path.is_file() else str(path)


def outcome_exit(tally: Tally, controls: Controls, *, command: str = "run") -> Exit:
    """How a run that was not stopped by a failure ends, for the exit code and the footer.

    For `sync`, "already exists", "vanished" and "deferred" are not the end of the story:
    its rounds (commands/sync_rounds.py) list again and carry out what is still different,
    and raise StillDifferent (exit 3) if a difference remains. (For `run`, "exists" is done:
    create does not update, by design.)"""
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
    return Exit.OK


async def journal(
    runner: Runner,
    book: Ledger,
    header: RunHeader,
    work: Coroutine[Any, Any, Tally],
    published: Published,
) -> Exit:
    """Write the header, do the work, and always write the footer (unless killed)."""
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
        summarize(tally, code)
    return code


def summarize(tally: Tally, code: Exit) -> None:
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


def ticker(progress: Progress, published: Published, settings: Settings) -> Callable[[Tally], None]:
    def tick(tally: Tally) -> None:
        progress.tick(tally)
        published.tick(tally, settings.pacing.rate)

    return tick
