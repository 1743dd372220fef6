"""`worker sync`: list the account, compare it with the manifest, carry out the difference.

The account (account.Listing: every group one listing saw, however the account moved under
it) and the manifest meet in reconcile.plan_sync; nothing is written before the plan is
accepted (prune scope, --max-delete). Then sync_rounds carries out the difference, lists
again and corrects what is still different, all under the run's one budget.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import orjson
import structlog

from worker.api.account import Listed
from worker.commands.sync_rounds import Rounds, list_once
from worker.errors import Exit, ManifestError, PlanRefused
from worker.manifest import spool
from worker.manifest.load import before_writes, scan_manifest
from worker.manifest.values import Scan
from worker.plan import reconcile
from worker.progress import Progress
from worker.runner.dispatch import Runner
from worker.session import Opened, Session, carry_out, check_exit
from worker.settings import LIMITS

log = structlog.get_logger("worker")


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


def sync(session: Session, sync_options: SyncOptions) -> Exit:
    """`worker sync`: list the account, compare it with the manifest, carry out the difference."""
    with scan_manifest(session.settings.manifest, session.settings.ledger) as scan:
        if scan.problem_count and not session.settings.skip_invalid:
            raise ManifestError(scan.problems, scan.problem_count)

        async def look(opened: Opened) -> Exit:
            return await _plan_only(opened, sync_options, scan)

        async def write(opened: Opened) -> Exit:
            return await _sync(opened, sync_options, scan)

        if session.settings.dry_run or sync_options.check:
            return carry_out(session, look)
        return carry_out(session, write, recorded=scan)


async def list_account(runner: Runner) -> Mapping[str, Listed]:
    """One listing under the run's budget: every group it saw (sync_rounds.list_once)."""
    listing, _ = await list_once(runner)
    return listing.groups


async def _plan_only(opened: Opened, sync_options: SyncOptions, scan: Scan) -> Exit:
    """--dry-run and --check: the plan printed, nothing written. A plan a real sync would
    refuse is printed too, then refused (exit 2)."""
    log.info("sync.start", credentials=opened.source)
    groups = await list_account(opened.runner)
    out = opened.session.out
    with before_writes():
        # Plan without the --max-delete fence, so the plan a real sync would refuse can be
        # looked at; the refusal is said below and in the exit code.
        the_plan = _plan(sync_options, scan, groups, max_delete=int(LIMITS["max-delete"].high))
        _plan_metrics(opened, the_plan, sync_options.prune)
        changes = reconcile.iter_changes(the_plan, spool.read(scan), groups)
        if opened.session.options.json:
            out.write(orjson.dumps(reconcile.render_json(the_plan, changes)).decode() + "\n")
        else:
            for line in reconcile.render_text(the_plan, changes):
                print(line, file=out)
    out.flush()
    refused = len(the_plan.deletes) > sync_options.max_delete
    if refused:
        log.warning(
            "sync.plan_refused",
            deletes=len(the_plan.deletes),
            max_delete=sync_options.max_delete,
            hint="a real sync refuses this plan before any write (exit 2): narrow "
            "the scope, or raise --max-delete",
        )
    if sync_options.check:
        return check_exit(reconcile.in_sync(the_plan, sync_options.prune))
    if refused:
        raise PlanRefused(
            f"the plan deletes {len(the_plan.deletes)} groups, more than --max-delete "
            f"{sync_options.max_delete}: a real sync refuses it; nothing was sent"
        )
    return Exit.OK


def _plan(
    sync_options: SyncOptions,
    scan: Scan,
    groups: Mapping[str, Listed],
    *,
    max_delete: int | None = None,
) -> reconcile.SyncPlan:
    the_plan = reconcile.plan_sync(
        spool.read(scan),
        groups,
        prune=sync_options.prune,
        scope=sync_options.scope,
        max_delete=sync_options.max_delete if max_delete is None else max_delete,
    )
    log.info("sync.plan", **the_plan.counts)
    return the_plan


def _plan_metrics(opened: Opened, the_plan: reconcile.SyncPlan, prune: bool) -> None:
    """worker_plan_items and worker_last_check_timestamp_seconds, for every sync: a drift
    alert reads them, not the logs. Deletes count only with --prune, as for --check."""
    if opened.published is not None:
        counts = dict(the_plan.counts)
        counts["delete"] = counts["delete"] if prune else 0
        opened.published.planned(counts)


async def _sync(opened: Opened, sync_options: SyncOptions, scan: Scan) -> Exit:
    log.info("sync.start", credentials=opened.source)
    runner = opened.runner
    listing, listed_at = await list_once(runner)
    # Nothing is written before the listing is complete and the plan accepted.
    with before_writes():
        the_plan = _plan(sync_options, scan, listing.groups)
    _plan_metrics(opened, the_plan, sync_options.prune)
    progress = Progress(
        tty=sys.stderr.isatty(), total=scan.groups + scan.invalid + len(the_plan.deletes)
    )
    runner.tally.to_send = the_plan.create + the_plan.update + len(the_plan.deletes)
    the_rounds = Rounds(
        runner=runner,
        scan=scan,
        prune=sync_options.prune,
        scope=sync_options.scope,
        max_delete=sync_options.max_delete,
        pause=runner.sleep,
        fresh_s=opened.session.hooks.fresh_s,
    )
    the_rounds.start(listing, listed_at)
    header = opened.header(scan, plan=the_plan.counts)
    return await opened.record(header, the_rounds.run(the_plan), progress)
