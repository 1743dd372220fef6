"""`worker run`: create every manifest group the ledger does not record as done.

The manifest (read once into its spool) is streamed past the ledger's latest word per Name
(run_plan.decide): what is new, deferred, in doubt or fixed becomes a create; invalid lines become
results; the rest is skipped and counted as it goes by.
"""

from __future__ import annotations

import mmap
import sys
from collections import Counter
from collections.abc import Iterator

import structlog

from worker.errors import Exit, ManifestError
from worker.ledger import prebuild
from worker.ledger.layout import OUTCOME_NO
from worker.ledger.load import read_state
from worker.ledger.records import Action, Result
from worker.manifest import spool
from worker.manifest.load import before_writes, scan_manifest
from worker.manifest.values import Invalid, Scan
from worker.plan import ahead, run_plan
from worker.progress import Progress
from worker.runner.work import Work
from worker.session import Opened, Session, carry_out, dry_run_exit, invalid_line

log = structlog.get_logger("worker")

# The outcomes whose slot, with the line's fingerprint, makes run_plan.decide_on say "done".
DONE_OUTCOMES = bytes(sorted(OUTCOME_NO[o] for o in run_plan.HELD))


def run(session: Session) -> Exit:
    """`worker run`: create every manifest group the ledger does not record as done."""
    settings = session.settings
    if settings.dry_run:
        with scan_manifest(settings.manifest, settings.ledger) as scan:
            if scan.problem_count and not settings.skip_invalid:
                raise ManifestError(scan.problems, scan.problem_count)
            return _dry_run(session, scan)
    # The ledger's index, if it must be rebuilt, is rebuilt by a second process while this
    # one validates the manifest (prebuild.py); then, while it waits for the index, this
    # one offers the manifest's Names for that process to mark those done (premark.py).
    with (
        prebuild.started(settings.ledger, settings.manifest, DONE_OUTCOMES) as prebuilt,
        scan_manifest(settings.manifest, settings.ledger) as scan,
    ):
        if scan.problem_count and not settings.skip_invalid:
            raise ManifestError(scan.problems, scan.problem_count)
        if prebuilt is not None:
            prebuilt.offer(_offered(scan))

        async def work(opened: Opened) -> Exit:
            marks = prebuilt.marks() if prebuilt is not None else None
            return await _create(opened, scan, session.options.retry_rejected, marks)

        return carry_out(session, work, recorded=scan, prebuilt=prebuilt)


def _dry_run(session: Session, scan: Scan) -> Exit:
    """The plan counted against the ledger; nothing is sent or written."""
    settings, out = session.settings, session.out
    state = read_state(settings.ledger)
    try:
        with before_writes():
            counted = run_plan.count(
                spool.read(scan), state.latest, retry_rejected=session.options.retry_rejected
            )
    finally:
        state.close()  # the index's mapping
    print(
        f"plan for {settings.manifest} (ledger {settings.ledger}); dry run, nothing sent:",
        file=out,
    )
    for line in counted.lines():
        print(line, file=out)
    _say_drift(counted.counts)
    return dry_run_exit(counted.counts)


def _say_drift(counts: Counter[str]) -> None:
    """The lines `run` cannot make true, and the command that can (exit 6)."""
    drifted = sum(counts[why] for why in run_plan.DRIFT)
    if drifted:
        log.warning("run.drift", lines=drifted, hint=run_plan.SYNC_HINT)


async def _create(
    opened: Opened, scan: Scan, retry_rejected: bool, marks: mmap.mmap | None
) -> Exit:
    runner = opened.runner
    log.info(
        "run.start",
        manifest=str(scan.path),
        ledger=str(opened.settings.ledger),
        target=str(opened.target),
        credentials=opened.source,
        rate=opened.settings.pacing.rate,
        lines=scan.groups + scan.invalid,
        concurrency_cap=runner.concurrency.cap,
    )
    # No counting pass before the first request: the plan is counted as the items go by
    # (a resume of 10^6 lines would otherwise read the spool and the index twice).
    progress = Progress(tty=sys.stderr.isatty(), total=scan.groups + scan.invalid)
    header = opened.header(scan, plan={})  # counted as it goes: see the footer
    try:
        work = runner.apply(_run_source(opened, scan, retry_rejected, marks))
        return await opened.record(header, work, progress)
    finally:
        _say_drift(runner.tally.skipped)
        for why, n in runner.tally.planned.items():
            if why != "new":
                log.info(
                    "run.resend" if why in run_plan.SENDS else "run.skip",
                    reason=why,
                    count=n,
                    why=run_plan.REASONS[why],
                )


def _offered(scan: Scan) -> Iterator[tuple[int, str, str]]:
    """The spool's valid items as the plan numbers them: (number, Name, fingerprint)."""
    for k, item in enumerate(spool.read_lazily(scan)):
        if not isinstance(item, Invalid):
            yield k, item.name, item.fingerprint


def _run_source(
    opened: Opened, scan: Scan, retry_rejected: bool, premarks: mmap.mmap | None = None
) -> Iterator[Work | Result]:
    """The manifest as work items: what the plan sends, the invalid lines as results. A
    line the index's rebuild marked done (`premarks`: premark.py) is skipped without a
    lookup; every line, when it marked them all. Else a large manifest's every other block
    of lines is looked up by a helper meanwhile (plan/ahead.py): a line it marked done is
    skipped without a lookup too."""
    assert opened.ledger is not None
    latest, tally = opened.ledger.state.latest, opened.runner.tally
    get, decide_on, skip = latest.get, run_plan.decide_on, run_plan.Do.SKIP
    done, block = run_plan.DONE_DECISION, ahead.BLOCK
    pre = premarks if premarks is not None else b""
    if _all_marked(scan, pre):
        tally.planned[done.why] += scan.groups
        tally.skipped[done.why] += scan.groups
        return
    with ahead.looked_ahead(scan, latest, retry_rejected) as helper:
        marks = helper.marks if helper is not None else b""
        # Lazily: a line the plan skips (all of them, in a rerun) never has its body cut out.
        for k, item in enumerate(spool.read_lazily(scan)):
            if isinstance(item, Invalid):
                tally.planned[run_plan.INVALID.why] += 1
                yield invalid_line(opened.runner, item)
                continue
            # The rebuild's marks (premark.py), then the helper's (ahead.helps).
            if (k < len(pre) and pre[k]) or (k // block & 1 and k < len(marks) and marks[k]):
                decision = done
            else:
                decision = decide_on(
                    get(item.name), item.fingerprint, retry_rejected=retry_rejected
                )
            tally.planned[decision.why] += 1
            if decision.do is skip:
                tally.skipped[decision.why] += 1
                continue
            yield Work(
                action=Action.CREATE,
                name=item.name,
                line=item.line,
                fingerprint=item.fingerprint,
                body=item.body,
            )


def _all_marked(scan: Scan, premarks: mmap.mmap | bytes) -> bool:
    """Every line of the manifest valid and marked done: the plan has nothing to send."""
    groups = scan.groups
    return (
        groups > 0
        and not scan.invalid
        and len(premarks) >= groups
        and premarks[:groups].count(1) == groups
    )
