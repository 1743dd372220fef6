"""`worker run`: create every manifest group the ledger does not record as done.

The manifest (read once into its spool) is streamed past the ledger's latest word per Name
(run_plan.decide): what is new, deferred, in doubt or fixed becomes a create; invalid lines become
results; the rest is skipped and counted as it goes by.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from typing import IO

import structlog

from worker import __version__, compose
from worker.api.signing import Credentials
from worker.compose import Loop, Options, Published
from worker.errors import Exit, ManifestError
from worker.ledger.journal import Ledger
from worker.ledger.load import read_state
from worker.ledger.records import Action, Outcome, Result, RunHeader, Target
from worker.manifest import spool
from worker.manifest.values import Invalid, Scan
from worker.plan import run_plan
from worker.progress import Progress
from worker.runner.controls import Controls
from worker.runner.dispatch import Runner
from worker.runner.stamps import stamp
from worker.runner.work import Work
from worker.settings import Settings

log = structlog.get_logger("worker")


def run(settings: Settings, options: Options, controls: Controls, loop: Loop, out: IO[str]) -> Exit:
    """`worker run`: create every manifest group the ledger does not record as done."""
    with compose.scan_manifest(settings) as scan:
        if scan.problem_count and not settings.skip_invalid:
            raise ManifestError(scan.problems, scan.problem_count)
        if settings.dry_run:
            state = read_state(settings.ledger)
            try:
                with compose.before_writes():
                    counted = run_plan.count(
                        spool.read(scan), state.latest, retry_rejected=options.retry_rejected
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
        settings, creds, source = compose.load_credentials(settings, options)
        target = compose.target_of(settings, creds, options)
        with compose.open_ledger(settings.ledger, target, expect_names=scan.groups) as book:
            compose.remember_manifest(scan, settings)
            return loop(
                _run(settings, options, scan, book, creds, target, source, controls), controls
            )


async def _run(
    settings: Settings,
    options: Options,
    scan: Scan,
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
    published = compose.Published(options, "run", settings.pacing.rate)
    published.write()  # the textfile exists from the start, not from the first tick
    with published.serving():
        async with (
            compose.account_for(settings, creds, target, options) as account,
            compose.runner_for(
                account,
                book=book,
                controls=controls,
                run_id=run_id,
                metrics=published.metrics,
                lists=False,
            ) as runner,
        ):
            runner.on_tick = compose.ticker(progress, published, settings)
            return await _run_in(
                runner, settings, scan, book, target, source, progress, published, options
            )


async def _run_in(
    runner: Runner,
    settings: Settings,
    scan: Scan,
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
        manifest=compose.manifest_name(scan.path),
        manifest_sha256=scan.sha256,
        items=scan.groups + scan.invalid,
        plan={},
        settings=settings.public(),
    )  # counted as it goes: see the footer
    try:
        work = _run_source(scan, book, runner, options.retry_rejected)
        return await compose.journal(runner, book, header, runner.apply(work), published)
    finally:
        progress.close(runner.tally)
        for why, n in runner.tally.planned.items():
            if why != "new":
                log.info(
                    "run.resend" if why in run_plan.SENDS else "run.skip",
                    reason=why,
                    count=n,
                    why=run_plan.REASONS[why],
                )


def _run_source(
    scan: Scan, book: Ledger, runner: Runner, retry_rejected: bool
) -> Iterator[Work | Result]:
    """The manifest as work items: what the plan sends, the invalid lines as results."""
    for item in spool.read(scan):
        decision = run_plan.decide(item, book.state.latest, retry_rejected=retry_rejected)
        runner.tally.planned[decision.why] += 1
        if decision.do is run_plan.Do.SKIP:
            runner.tally.skipped[decision.why] += 1
        elif isinstance(item, Invalid):
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
