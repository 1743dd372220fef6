"""Composition root: from settings to a finished `run`, `sync` or `export`.

Opens what a command needs (the manifest scan, the credentials or the embedded sandbox, the
ledger, the rate budget, the transport), each by exactly one `with`, hands them to the
Runner, and turns what happened into an exit code. It knows nothing of arguments or signals:
the CLI passes `Controls` in and runs the coroutines under its signal handlers (`Loop`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, Protocol, assert_never

import orjson
import structlog

from worker import __version__, api, credentials, ledger, manifest, plan, reconcile
from worker.account import Listed, Listing
from worker.errors import (
    Exit,
    LedgerError,
    LedgerWriteError,
    ManifestError,
    SpoolError,
    UsageError,
    WorkerError,
)
from worker.export import export_lines
from worker.ledger import Ledger
from worker.metrics import Metrics
from worker.pacing import LocalPacer, Pacer
from worker.progress import Progress
from worker.records import Action, Footer, Outcome, Result, RunHeader, StopReason, Target
from worker.runner import Controls, Runner, Tally, Work, machine_cap, stamp, utcnow
from worker.settings import LIMITS, Settings, redact_url
from worker.signing import Credentials
from worker.transport import MAX_BODY_BYTES, Reachability, Transport

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
async def _account(
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
    from worker.pacing_redis import RedisPacer  # only runs with --limiter pay for redis-py

    async with RedisPacer(
        settings.limiter_url,
        pacing=settings.pacing,
        endpoint=settings.endpoint,
        access_key=creds.access_key,
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


@contextlib.contextmanager
def _before_writes() -> Iterator[None]:
    """A spool that cannot be read back before any write was sent: exit 2, not 7."""
    try:
        yield
    except SpoolError as exc:
        raise LedgerError(f"{exc}; nothing was changed") from None


def _manifest_name(path: Path) -> str:
    """The manifest as the header records it: absolute for a regular file, so that `report`
    finds it from any folder; as given for a pipe (there is nothing to find again)."""
    return str(path.resolve()) if path.is_file() else str(path)


def outcome_exit(tally: Tally, controls: Controls, *, command: str = "run") -> Exit:
    """How a run that was not stopped by a failure ends, for the exit code and the footer.

    For `sync`, a create answered "already exists" means the listing did not show a group
    that is there (a lagging listing, or someone else just made it): its project and tags were
    never compared, so the account is not known to match. Exit 3: the next sync lists it and
    compares it. (For `run`, "exists" is done: create does not update, by design.)"""
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
    if tally.count(Outcome.DEFERRED) or tally.count(Outcome.VANISHED):
        return Exit.RETRY_LATER
    if command == "sync" and tally.count(Outcome.EXISTS):
        log.warning(
            "sync.unverified",
            exists=tally.count(Outcome.EXISTS),
            hint="groups the listing did not show exist: the next sync compares them",
        )
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


# -- run ----------------------------------------------------------------------------------


def run(settings: Settings, options: Options, controls: Controls, loop: Loop, out: IO[str]) -> Exit:
    """`worker run`: create every manifest group the ledger does not record as done."""
    with manifest.scan(settings.manifest, spool_dir=settings.ledger.parent) as scan:
        if scan.problem_count and not settings.skip_invalid:
            raise ManifestError(scan.problems, scan.problem_count)
        if settings.dry_run:
            state = ledger.read_state(settings.ledger)
            try:
                with _before_writes():
                    counted = plan.count(
                        manifest.read(scan), state.latest, retry_rejected=options.retry_rejected
                    )
            finally:
                state.close()  # the index's mapping
            print(
                f"plan for {settings.manifest} (ledger {settings.ledger}); dry run, nothing sent:",
                file=out,
            )
            for line in counted.lines():
                print(line, file=out)
            return Exit.OK
        settings, creds, source = load_credentials(settings, options)
        target = target_of(settings, creds, options)
        with open_ledger(settings.ledger, target, expect_names=scan.groups) as book:
            return loop(
                _run(settings, options, scan, book, creds, target, source, controls), controls
            )


async def _run(
    settings: Settings,
    options: Options,
    scan: manifest.Scan,
    book: Ledger,
    creds: Credentials | None,
    target: Target,
    source: str,
    controls: Controls,
) -> Exit:
    run_id = uuid.uuid4().hex
    structlog.contextvars.bind_contextvars(run_id=run_id)
    # No counting pass before the first request: the plan is counted as the items go by
    # (a resume of 10^6 lines would otherwise read the spool and the index twice).
    progress = Progress(tty=sys.stderr.isatty(), total=scan.groups + scan.invalid)
    published = Published(options, "run", settings.pacing.rate)
    published.write()  # the textfile exists from the start, not from the first tick
    with published.serving():
        async with (
            _account(settings, creds, target, options) as account,
            runner_for(
                account,
                book=book,
                controls=controls,
                run_id=run_id,
                metrics=published.metrics,
                lists=False,
            ) as runner,
        ):
            runner.on_tick = _ticker(progress, published, settings)
            return await _run_in(
                runner, settings, scan, book, target, source, progress, published, options
            )


def _ticker(
    progress: Progress, published: Published, settings: Settings
) -> Callable[[Tally], None]:
    def tick(tally: Tally) -> None:
        progress.tick(tally)
        published.tick(tally, settings.pacing.rate)

    return tick


async def _run_in(
    runner: Runner,
    settings: Settings,
    scan: manifest.Scan,
    book: Ledger,
    target: Target,
    source: str,
    progress: Progress,
    published: Published,
    options: Options,
) -> Exit:
    log.info(
        "run.start",
        manifest=str(scan.path),
        ledger=str(book.path),
        target=str(target),
        credentials=source,
        rate=settings.pacing.rate,
        lines=scan.groups + scan.invalid,
        concurrency_cap=runner.concurrency.cap,
    )
    header = RunHeader(
        run_id=runner.run_id,
        started=stamp(runner.wall()),
        version=__version__,
        command="run",
        target=target,
        manifest=_manifest_name(scan.path),
        manifest_sha256=scan.sha256,
        items=scan.groups + scan.invalid,
        plan={},
        settings=settings.public(),
    )  # counted as it goes: see the footer
    try:
        work = _run_source(scan, book, runner, options.retry_rejected)
        return await journal(runner, book, header, runner.apply(work), published)
    finally:
        progress.close(runner.tally)
        for why, n in runner.tally.planned.items():
            if why != "new":
                log.info(
                    "run.resend" if why in plan.SENDS else "run.skip",
                    reason=why,
                    count=n,
                    why=plan.REASONS[why],
                )


def _run_source(
    scan: manifest.Scan, book: Ledger, runner: Runner, retry_rejected: bool
) -> Iterator[Work | Result]:
    """The manifest as work items: what the plan sends, the invalid lines as results."""
    for item in manifest.read(scan):
        decision = plan.decide(item, book.state.latest, retry_rejected=retry_rejected)
        runner.tally.planned[decision.why] += 1
        if decision.do is plan.Do.SKIP:
            runner.tally.skipped[decision.why] += 1
        elif isinstance(item, manifest.Invalid):
            now = stamp(runner.wall())
            yield Result(
                run_id=runner.run_id,
                action=None,
                name=item.name,
                outcome=Outcome.INVALID,
                status=None,
                code="InvalidManifestLine",
                message=str(item.problem),
                request_id="",
                sends=0,
                fingerprint=None,
                line=item.line,
                started=now,
                finished=now,
            )
        else:
            yield Work(
                action=Action.CREATE,
                name=item.name,
                line=item.line,
                fingerprint=item.fingerprint,
                body=item.body,
            )


# -- sync ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncOptions:
    prune: bool
    scope: reconcile.Scope
    max_delete: int
    check: bool

    @classmethod
    def build(
        cls,
        *,
        prune: bool,
        projects: Iterable[str],
        match: str | None,
        max_delete: int | None,
        check: bool,
    ) -> SyncOptions:
        """Checked before anything is read or sent: prune needs a scope (exit 2)."""
        scope = reconcile.Scope.from_flags(projects, match)
        reconcile.require_scope(prune, scope)
        limit = LIMITS["max-delete"].check(
            reconcile.DEFAULT_MAX_DELETE if max_delete is None else max_delete
        )
        return cls(prune=prune, scope=scope, max_delete=limit, check=check)


def sync(
    settings: Settings,
    options: Options,
    sync_options: SyncOptions,
    controls: Controls,
    loop: Loop,
    out: IO[str],
) -> Exit:
    """`worker sync`: list the account, compare it with the manifest, carry out the difference."""
    with manifest.scan(settings.manifest, spool_dir=settings.ledger.parent) as scan:
        if scan.problem_count and not settings.skip_invalid:
            raise ManifestError(scan.problems, scan.problem_count)
        settings, creds, source = load_credentials(settings, options)
        log.info("sync.start", credentials=source)
        target = target_of(settings, creds, options)
        if settings.dry_run or sync_options.check:
            return loop(
                _sync_plan_only(
                    settings, options, sync_options, scan, creds, target, controls, out
                ),
                controls,
            )
        with open_ledger(settings.ledger, target, expect_names=scan.groups) as book:
            return loop(
                _sync(settings, options, sync_options, scan, book, creds, target, controls),
                controls,
            )


async def list_account(runner: Runner) -> Mapping[str, Listed]:
    """Page through List under the run's budget until the pages add up (account.Listing)."""
    listing = Listing()
    while (body := listing.next_request()) is not None:
        result = await runner.read(api.LIST, orjson.dumps(body))
        if (why := listing.add_result(result)) is not None:
            log.warning("sync.relist", why=why, restarts=listing.restarts)
    groups = listing.groups
    log.info("sync.listed", groups=len(groups), requests=listing.requests)
    return groups


async def _sync_plan_only(
    settings: Settings,
    options: Options,
    sync_options: SyncOptions,
    scan: manifest.Scan,
    creds: Credentials | None,
    target: Target,
    controls: Controls,
    out: IO[str],
) -> Exit:
    async with (
        _account(settings, creds, target, options) as account,
        runner_for(account, book=None, controls=controls, run_id=uuid.uuid4().hex) as runner,
    ):
        groups = await list_account(runner)
    with _before_writes():
        the_plan = _plan(sync_options, scan, groups)
        changes = reconcile.iter_changes(the_plan, manifest.read(scan), groups)
        if options.json:
            out.write(orjson.dumps(reconcile.render_json(the_plan, changes)).decode() + "\n")
        else:
            for line in reconcile.render_text(the_plan, changes):
                print(line, file=out)
    out.flush()
    if sync_options.check:
        return Exit.OK if reconcile.in_sync(the_plan, sync_options.prune) else Exit.DRIFT
    return Exit.OK


def _plan(
    sync_options: SyncOptions, scan: manifest.Scan, groups: Mapping[str, Listed]
) -> reconcile.SyncPlan:
    the_plan = reconcile.plan_sync(
        manifest.read(scan),
        groups,
        prune=sync_options.prune,
        scope=sync_options.scope,
        max_delete=sync_options.max_delete,
    )
    log.info("sync.plan", **the_plan.counts)
    return the_plan


async def _sync(
    settings: Settings,
    options: Options,
    sync_options: SyncOptions,
    scan: manifest.Scan,
    book: Ledger,
    creds: Credentials | None,
    target: Target,
    controls: Controls,
) -> Exit:
    run_id = uuid.uuid4().hex
    structlog.contextvars.bind_contextvars(run_id=run_id)
    published = Published(options, "sync", settings.pacing.rate)
    published.write()  # during a long listing too
    with published.serving():
        async with (
            _account(settings, creds, target, options) as account,
            runner_for(
                account, book=book, controls=controls, run_id=run_id, metrics=published.metrics
            ) as runner,
        ):
            return await _sync_in(runner, settings, sync_options, scan, book, target, published)


async def _sync_in(
    runner: Runner,
    settings: Settings,
    sync_options: SyncOptions,
    scan: manifest.Scan,
    book: Ledger,
    target: Target,
    published: Published,
) -> Exit:
    groups = await list_account(runner)
    # Nothing is written before the listing is complete and the plan accepted.
    with _before_writes():
        the_plan = _plan(sync_options, scan, groups)
    to_send = the_plan.create + the_plan.update + len(the_plan.deletes)
    progress = Progress(
        tty=sys.stderr.isatty(), total=scan.groups + scan.invalid + len(the_plan.deletes)
    )
    runner.on_tick = _ticker(progress, published, settings)
    runner.tally.to_send = to_send
    header = RunHeader(
        run_id=runner.run_id,
        started=stamp(runner.wall()),
        version=__version__,
        command="sync",
        target=target,
        manifest=_manifest_name(scan.path),
        manifest_sha256=scan.sha256,
        items=scan.groups + scan.invalid,
        plan=the_plan.counts,
        settings=settings.public(),
    )
    try:
        work = _sync_source(the_plan, scan, groups, runner)
        return await journal(runner, book, header, runner.apply(work), published)
    finally:
        progress.close(runner.tally)


def _sync_source(
    the_plan: reconcile.SyncPlan, scan: manifest.Scan, groups: Mapping[str, Listed], runner: Runner
) -> Iterator[Work | Result]:
    """The difference as work items: creates and updates while the manifest streams by,
    conflicts and invalid lines as results, then the deletes the plan allowed."""

    def unsent(name: str | None, line: int, outcome: Outcome, code: str, message: str) -> Result:
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
            fingerprint=None,
            line=line,
            started=now,
            finished=now,
        )

    for item in manifest.read(scan):
        if isinstance(item, manifest.Invalid):
            yield unsent(
                item.name, item.line, Outcome.INVALID, "InvalidManifestLine", str(item.problem)
            )
            continue
        change = reconcile.classify_group(item, groups)
        match change:
            case reconcile.Create():
                yield Work(
                    action=Action.CREATE,
                    name=item.name,
                    line=item.line,
                    fingerprint=item.fingerprint,
                    body=item.body,
                )
            case reconcile.Update():
                yield Work(
                    action=Action.UPDATE,
                    name=item.name,
                    line=item.line,
                    fingerprint=item.fingerprint,
                    body=reconcile.update_body(item),
                )
            case reconcile.Conflict():
                yield unsent(
                    item.name,
                    item.line,
                    Outcome.CONFLICT,
                    "ProjectConflict",
                    f"the account's group is in project {change.listed.project!r}, "
                    f"the manifest says {change.manifest_project!r}; a project "
                    "cannot be changed after creation",
                )
            case reconcile.InSync():
                runner.tally.skipped["in_sync"] += 1
            case _:
                assert_never(change)
    for listed in the_plan.deletes:
        yield Work(
            action=Action.DELETE,
            name=listed.name,
            line=0,
            fingerprint=None,
            body=reconcile.delete_body(listed.name),
        )


# -- export -------------------------------------------------------------------------------


def export(
    settings: Settings,
    options: Options,
    projects: frozenset[str],
    output: Path | None,
    controls: Controls,
    loop: Loop,
    out: IO[str],
) -> Exit:
    """`worker export`: the account's available groups as a manifest, sorted by Name."""
    if output is not None and output.exists() and not output.is_file():
        raise UsageError(f"-o {output}: not a regular file")
    settings, creds, source = load_credentials(settings, options)
    log.info("export.start", credentials=source)
    target = target_of(settings, creds, options)
    return loop(
        _export(settings, options, projects, output, creds, target, controls, out), controls
    )


async def _export(
    settings: Settings,
    options: Options,
    projects: frozenset[str],
    output: Path | None,
    creds: Credentials | None,
    target: Target,
    controls: Controls,
    out: IO[str],
) -> Exit:
    async with (
        _account(settings, creds, target, options) as account,
        runner_for(account, book=None, controls=controls, run_id=uuid.uuid4().hex) as runner,
    ):
        groups = await list_account(runner)
    lines = export_lines(groups.values(), projects or None)
    if output is None:
        out.flush()
        out.buffer.write(b"".join(lines))  # type: ignore[attr-defined]
        out.flush()
    else:
        _write_atomically(output, lines)
    log.info("export.done", groups=len(lines), output=str(output) if output else "stdout")
    return Exit.OK


def _write_atomically(path: Path, lines: list[bytes]) -> None:
    """Write beside the target, fsync, rename: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UsageError(f"-o {path}: cannot write it: {exc.strerror}") from None
