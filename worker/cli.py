"""Command line: arguments -> Settings, logging, the event loop, signals, exit codes.

The only module that knows it is a process. Every WorkerError becomes a message and an exit
code here; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import NoReturn

import orjson
import structlog

from worker import __version__, api, credentials, ledger, logs, manifest, plan, report
from worker.errors import (
    Exit,
    LedgerError,
    LedgerLocked,
    ManifestError,
    RunAborted,
    UsageError,
    WorkerError,
)
from worker.pacing import LocalPacer, Pacer
from worker.progress import Progress
from worker.runner import Controls, Run, Tally, utcnow
from worker.settings import Pacing, RetryPolicy, Settings
from worker.signing import Credentials
from worker.transport import Transport

EXIT_OK, EXIT_REJECTED, EXIT_USAGE, EXIT_DEFERRED, EXIT_INTERRUPTED, EXIT_LOCKED = (
    Exit.OK, Exit.REJECTED, Exit.USAGE, Exit.RETRY_LATER, Exit.INTERRUPTED, Exit.LOCKED)
log = structlog.get_logger("worker")


def main(argv: Sequence[str] | None = None) -> NoReturn:
    sys.exit(run_cli(argv))


def run_cli(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    tty = sys.stderr.isatty()
    fmt = args.log_format if args.log_format != "auto" else ("console" if tty else "json")
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logs.configure(json=fmt == "json", level=level)
    try:
        code: int = args.command(args)
        return code
    except ManifestError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        if exc.total > len(exc.problems):
            print(f"... and {exc.total - len(exc.problems)} more problem(s)", file=sys.stderr)
        print(f"error: the manifest has {exc.total} problem(s); nothing was sent",
              file=sys.stderr)
        return exc.exit_code
    except LedgerLocked as exc:
        print(f"error: {exc}; nothing was changed", file=sys.stderr)
        return exc.exit_code
    except WorkerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


# -- run ----------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    scan = manifest.scan(settings.manifest)
    if scan.problem_count and not settings.skip_invalid:
        raise ManifestError(scan.problems, scan.problem_count)
    if settings.dry_run:
        return _dry_run(settings, scan)
    creds = None if args.sandbox else credentials.load(os.environ, Path.home())
    book = ledger.Ledger.open(
        settings.ledger,
        torn_writes_s=float(os.environ.get("WORKER_TEST_TORN_WRITES_S", "0") or 0))
    try:
        return asyncio.run(_run(settings, scan, book, creds, sandbox_on=args.sandbox))
    finally:
        book.close()


def _dry_run(settings: Settings, scan: manifest.Scan) -> int:
    state = ledger.read_state(settings.ledger)
    counted = plan.count(manifest.read(scan), state.latest)
    print(f"plan for {settings.manifest} (ledger {settings.ledger}); dry run, nothing sent:")
    for line in counted.lines():
        print(line)
    return EXIT_OK


async def _run(settings: Settings, scan: manifest.Scan, book: ledger.Ledger,
               creds: Credentials | None, *, sandbox_on: bool) -> int:
    async with _endpoint(settings, creds, sandbox_on) as (live, live_creds), \
            _pacer(live, live_creds) as pacer:
        progress = Progress(tty=sys.stderr.isatty(), stream=sys.stderr)
        run = Run(settings=live, credentials=live_creds, scan=scan, ledger=book, pacer=pacer,
                  controls=Controls(), wall=_wall_clock(), on_tick=progress.tick)
        counted = run.count_plan()
        log.info("run.start", run_id=run.run_id, manifest=str(scan.path),
                 ledger=str(book.path), endpoint=live.endpoint, rate=live.pacing.rate,
                 concurrency=live.in_flight, **dict(counted.counts))
        for why, n in counted.counts.items():
            if why != "new":
                log.info("run.resend" if why in plan.SENDS else "run.skip", reason=why,
                         count=n, why=plan.REASONS[why])
        progress.start(total=run.tally.to_send)
        try:
            tally = await _under_signals(run, live.grace_s)
        finally:
            progress.close(run.tally)
        if run.failure is not None:
            _finish(tally, interrupted=False)
            raise run.failure
        return _finish(tally, interrupted=run.controls.reason == "signal")


async def _under_signals(run: Run, grace_s: float) -> Tally:
    """Execute the run; the first SIGINT/SIGTERM drains it, and cancels it after `grace_s`;
    a second signal cancels it at once."""
    loop = asyncio.get_running_loop()
    execution = asyncio.ensure_future(_execute(run))
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        name = signal.Signals(signum).name
        if signals == 1:
            log.warning("run.stopping", signal=name, grace_s=grace_s,
                        hint="in-flight requests may finish; signal again to stop at once")
            run.controls.drain()
            loop.call_later(grace_s, execution.cancel)
        else:
            log.warning("run.stopping_now", signal=name)
            execution.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await execution
    except asyncio.CancelledError:
        return run.tally
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _execute(run: Run) -> Tally:
    settings = run.settings
    async with Transport(settings.endpoint, timeout_s=settings.timeout_s,
                         max_connections=settings.in_flight) as transport:
        try:
            return await run.execute(transport)
        except* RunAborted as group:
            raise group.exceptions[0] from None
        except* LedgerError as group:
            raise group.exceptions[0] from None


def _finish(tally: Tally, *, interrupted: bool) -> int:
    out = tally.outcomes
    log.info("run.summary", interrupted=interrupted, throttles=tally.throttles,
             skipped=sum(tally.skipped.values()), **{k: out[k] for k in ledger.OUTCOMES})
    if interrupted:
        print("stopped; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    # A rerun that skips unchanged rejected lines still has not done what the manifest asks.
    if out["rejected"] or out["invalid"] or tally.skipped["rejected_unchanged"]:
        return EXIT_REJECTED
    if out["deferred"]:
        return EXIT_DEFERRED
    return EXIT_OK


@contextlib.asynccontextmanager
async def _endpoint(settings: Settings, creds: Credentials | None, sandbox_on: bool
                    ) -> AsyncIterator[tuple[Settings, Credentials]]:
    """The real endpoint with the user's credentials, or an in-process sandbox."""
    if not sandbox_on:
        assert creds is not None
        yield settings, creds
        return
    from worker import sandbox

    async with sandbox.serve(sandbox.SandboxConfig(rate=int(settings.pacing.rate))) as sb:
        ak, sk = next(iter(sb.keys.items()))
        log.info("sandbox.started", url=sb.url, access_key=ak)
        yield replace(settings, endpoint=sb.url), Credentials(access_key=ak, secret_key=sk)


@contextlib.asynccontextmanager
async def _pacer(settings: Settings, creds: Credentials) -> AsyncIterator[Pacer]:
    """The in-process budget, or the one shared through Redis (--limiter)."""
    if not settings.limiter_url:
        yield LocalPacer(settings.pacing)
        return
    from worker.pacing_redis import RedisPacer  # only runs with --limiter pay for redis-py

    async with RedisPacer(settings.limiter_url, pacing=settings.pacing,
                          endpoint=settings.endpoint, access_key=creds.access_key,
                          timeout_s=settings.limiter_timeout_s) as shared:
        log.info("limiter.shared", limiter=settings.public()["limiter"])
        yield shared


def _wall_clock() -> Callable[[], datetime]:
    """UTC now, shifted by WORKER_TEST_CLOCK_OFFSET_S: a test hook that plays a host whose
    clock is off. Nothing in the rate budget reads this clock; X-Date and ledger times do."""
    offset = float(os.environ.get("WORKER_TEST_CLOCK_OFFSET_S", "0") or 0)
    if not offset:
        return utcnow
    return lambda: utcnow() + timedelta(seconds=offset)


def _settings(args: argparse.Namespace) -> Settings:
    path = Path(args.manifest)
    return Settings(
        manifest=path,
        ledger=Path(args.ledger) if args.ledger else ledger.default_path(path),
        endpoint=args.endpoint, region=args.region,
        pacing=Pacing(rate=args.rate, headroom=args.headroom),
        concurrency=args.concurrency,
        retry=RetryPolicy(max_attempts=args.max_attempts, item_deadline_s=args.item_deadline),
        timeout_s=args.timeout, grace_s=args.grace, dry_run=args.dry_run,
        skip_invalid=args.skip_invalid, limiter_url=args.limiter,
        limiter_timeout_s=args.limiter_timeout,
    )


# -- validate, report ---------------------------------------------------------------------

def cmd_validate(args: argparse.Namespace) -> int:
    scan = manifest.scan(Path(args.manifest))
    if scan.problem_count:
        raise ManifestError(scan.problems, scan.problem_count)
    print(f"{args.manifest}: {scan.groups} group(s), no problems")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    path = Path(args.ledger)
    if not path.is_file():
        raise UsageError(f"{path}: no such ledger")
    state = ledger.read_state(path)
    if args.failed:
        lines, invalid = report.failed_manifest(state)
        sys.stdout.buffer.write(b"".join(line + b"\n" for line in lines))
        sys.stdout.flush()
        if invalid:
            print(f"note: {invalid} invalid manifest line(s) are not listed; "
                  "`report` names them, fix them in the manifest", file=sys.stderr)
        return EXIT_OK
    summary = report.summarize(state)
    if args.json:
        print(orjson.dumps(summary).decode())
    else:
        print(report.render(summary))
    return EXIT_OK


# -- arguments ----------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse exits 2 too; keep its usage text
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="worker", description="Bulk provisioning of Volcengine Live "
                "pull-to-push groups: signed, paced, resumable.")
    p.add_argument("--version", action="version", version=f"worker {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    common.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    common.add_argument("--log-format", choices=("auto", "console", "json"), default="auto",
                        help="auto: console on a terminal, JSON lines otherwise")
    sub = p.add_subparsers(required=True, metavar="COMMAND", parser_class=_Parser)

    r = sub.add_parser("run", parents=[common], help="create every group of a manifest")
    r.add_argument("manifest", help="JSONL file, one group per line")
    r.add_argument("--ledger", help="result ledger (default: MANIFEST's name + .ledger.jsonl)")
    r.add_argument("--endpoint", default=api.DEFAULT_ENDPOINT)
    r.add_argument("--region", default=api.DEFAULT_REGION)
    r.add_argument("--rate", type=float, default=float(api.DOCUMENTED_RATE),
                   help="the account's limit in requests/s (default 10, the documented one)")
    r.add_argument("--headroom", type=float, default=Pacing().headroom, help=argparse.SUPPRESS)
    r.add_argument("--concurrency", type=int, default=0,
                   help="requests in flight (default: enough for the rate at 2 s latency)")
    r.add_argument("--max-attempts", type=int, default=RetryPolicy().max_attempts)
    r.add_argument("--item-deadline", type=float, default=RetryPolicy().item_deadline_s,
                   help="seconds one item may take across its attempts (default 300)")
    r.add_argument("--timeout", type=float, default=Settings.__dataclass_fields__[
        "timeout_s"].default, help="seconds one attempt may take (default 15)")
    r.add_argument("--grace", type=float, default=10.0,
                   help="seconds in-flight requests may finish after SIGINT/SIGTERM")
    r.add_argument("--dry-run", action="store_true", help="validate and show the plan only")
    r.add_argument("--skip-invalid", action="store_true",
                   help="record invalid lines as `invalid` and go on with the rest")
    r.add_argument("--sandbox", action="store_true",
                   help="run against an in-process sandbox with throwaway keys")
    r.add_argument("--limiter", default=os.environ.get("WORKER_LIMITER"),
                   help="shared rate budget, redis://HOST:PORT/DB (env WORKER_LIMITER)")
    r.add_argument("--limiter-timeout", type=float, default=60.0,
                   help="seconds the shared limiter may stay unreachable (default 60)")
    r.set_defaults(command=cmd_run)

    v = sub.add_parser("validate", parents=[common], help="check a manifest, send nothing")
    v.add_argument("manifest")
    v.set_defaults(command=cmd_validate)

    rep = sub.add_parser("report", parents=[common], help="summarize a ledger")
    rep.add_argument("ledger")
    rep.add_argument("--json", action="store_true", help="machine-readable counts")
    rep.add_argument("--failed", action="store_true",
                     help="print a manifest of the items not done, to fix and run again")
    rep.set_defaults(command=cmd_report)

    s = sub.add_parser("sandbox", parents=[common], help="run the local Live API")
    from worker import sandbox  # its own arguments; the aiohttp server loads only here

    sandbox.add_arguments(s)
    s.set_defaults(command=sandbox.main)
    return p
