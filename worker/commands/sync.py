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
from pathlib import Path

import orjson
import structlog

from worker.api.account import Listed, Listing
from worker.api.listed_store import NameSet
from worker.commands import confirm, sync_saved
from worker.commands.paging import list_once
from worker.commands.sync_rounds import Rounds
from worker.errors import Exit, ManifestError, PlanRefused
from worker.manifest import spool
from worker.manifest.load import before_writes, scan_manifest
from worker.manifest.values import Scan
from worker.plan import reconcile, render, saved
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
    plan_out: Path | None = None  # --plan-out: where a dry run saves its plan
    plan: saved.Saved | None = None  # --plan: the saved plan to carry out
    plan_path: Path | None = None
    yes: bool = False  # --yes: the terminal's question is answered
    verbose: bool = False  # -v: the text plan lists the kept extras
    replace: bool = False  # --replace-conflicts: inside the scope, a conflict is replaced

    @classmethod
    def build(
        cls,
        *,
        prune: bool,
        projects: Iterable[str],
        match: str | None,
        max_delete: int | None,
        check: bool,
        plan_out: Path | None = None,
        plan: saved.Saved | None = None,
        plan_path: Path | None = None,
        yes: bool = False,
        verbose: bool = False,
        replace: bool = False,
    ) -> SyncOptions:
        """Checked before anything is read or sent: prune and replace need a scope (exit 2)."""
        scope = reconcile.Scope.from_flags(projects, match)
        reconcile.require_scope(prune, scope, replace=replace)
        limit = LIMITS["max-delete"].check(
            reconcile.DEFAULT_MAX_DELETE if max_delete is None else max_delete
        )
        return cls(
            prune=prune,
            scope=scope,
            max_delete=limit,
            check=check,
            plan_out=plan_out,
            plan=plan,
            plan_path=plan_path,
            yes=yes,
            verbose=verbose,
            replace=replace,
        )

    def plan_options(self) -> saved.PlanOptions:
        """The options that shape a plan, as a saved plan records them."""
        match = self.scope.match
        return saved.PlanOptions(
            prune=self.prune,
            scope_projects=tuple(sorted(self.scope.projects)),
            scope_match=match.pattern if match is not None else None,
            max_delete=self.max_delete,
            replace_conflicts=self.replace,
        )


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


async def list_account(runner: Runner) -> Listing:
    """One listing under the run's budget: every group it saw (paging.list_once), kept
    on disk until the caller closes it."""
    listing, _ = await list_once(runner)
    return listing


async def _plan_only(opened: Opened, sync_options: SyncOptions, scan: Scan) -> Exit:
    """--dry-run and --check: the plan printed, nothing written. A plan a real sync would
    refuse is printed too, then refused (exit 2)."""
    log.info("sync.start", credentials=opened.source)
    with await list_account(opened.runner) as listing:
        return _look(opened, sync_options, scan, listing.groups)


def _look(
    opened: Opened, sync_options: SyncOptions, scan: Scan, groups: Mapping[str, Listed]
) -> Exit:
    out = opened.session.out
    with before_writes():
        # Plan without the --max-delete fence, so the plan a real sync would refuse can be
        # looked at; the refusal is said below and in the exit code.
        the_plan = _plan(sync_options, scan, groups, max_delete=int(LIMITS["max-delete"].high))
        _plan_metrics(opened, the_plan, sync_options.prune)
        changes = reconcile.iter_changes(the_plan, spool.read(scan), groups)
        if opened.session.options.json:
            out.write(orjson.dumps(render.render_json(the_plan, changes)).decode() + "\n")
        else:
            for line in render.render_text(the_plan, changes, list_kept=sync_options.verbose):
                print(line, file=out)
    out.flush()
    refused = the_plan.removals > sync_options.max_delete
    if sync_options.plan_out is not None and not refused:
        fresh = sync_saved.saved_plan(opened, sync_options.plan_options(), scan, the_plan, groups)
        saved.write(sync_options.plan_out, fresh)
        log.info("sync.plan_saved", path=str(sync_options.plan_out), **the_plan.counts)
    if refused:
        log.warning(
            "sync.plan_refused",
            deletes=the_plan.removals,
            max_delete=sync_options.max_delete,
            hint="a real sync refuses this plan before any write (exit 2): narrow "
            "the scope, or raise --max-delete",
        )
    if sync_options.check:
        return check_exit(reconcile.in_sync(the_plan, sync_options.prune))
    if refused:
        raise PlanRefused(
            f"the plan deletes {the_plan.removals} groups, more than --max-delete "
            f"{sync_options.max_delete}: a real sync refuses it; nothing was sent"
        )
    return Exit.OK


def _plan(
    sync_options: SyncOptions,
    scan: Scan,
    groups: Mapping[str, Listed],
    *,
    max_delete: int | None = None,
    gather: NameSet | None = None,
) -> reconcile.SyncPlan:
    the_plan = reconcile.plan_sync(
        spool.read(scan),
        groups,
        prune=sync_options.prune,
        scope=sync_options.scope,
        max_delete=sync_options.max_delete if max_delete is None else max_delete,
        replace=sync_options.replace,
        gather=gather,
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
    reviewed = sync_options.plan
    if reviewed is not None:  # before any request: the target, options and manifest
        sync_saved.refuse_stale(
            reviewed, sync_options.plan_path, sync_options.plan_options(), opened, scan, None, {}
        )
    listing, listed_at = await list_once(runner)
    with listing:
        return await _sync_listed(opened, sync_options, scan, listing, listed_at)


async def _sync_listed(
    opened: Opened, sync_options: SyncOptions, scan: Scan, listing: Listing, listed_at: float
) -> Exit:
    # The manifest's Names, gathered by the first plan's pass: the rounds keep them.
    with NameSet() as named:
        return await _carry_out(opened, sync_options, scan, listing, listed_at, named)


async def _carry_out(
    opened: Opened,
    sync_options: SyncOptions,
    scan: Scan,
    listing: Listing,
    listed_at: float,
    named: NameSet,
) -> Exit:
    runner = opened.runner
    reviewed = sync_options.plan
    # Nothing is written before the listing is complete and the plan accepted.
    with before_writes():
        if reviewed is not None:
            the_plan = _plan(sync_options, scan, listing.groups, max_delete=1 << 62, gather=named)
            sync_saved.refuse_stale(
                reviewed,
                sync_options.plan_path,
                sync_options.plan_options(),
                opened,
                scan,
                the_plan,
                listing.groups,
            )
        else:
            the_plan = _plan(sync_options, scan, listing.groups, gather=named)
            if sync_options.yes or not the_plan.removals or not confirm.at_terminal():
                pass
            elif not await _confirmed(opened, sync_options, scan, the_plan, listing.groups):
                raise PlanRefused("not confirmed (the answer was not `yes`); nothing was sent")
    _plan_metrics(opened, the_plan, sync_options.prune)
    progress = Progress(
        tty=sys.stderr.isatty(), total=scan.groups + scan.invalid + the_plan.removals
    )
    # A replace is two writes: the delete, then the create.
    runner.tally.to_send = the_plan.create + the_plan.update + 2 * len(the_plan.replaces)
    runner.tally.to_send += len(the_plan.deletes)
    the_rounds = Rounds(
        runner=runner,
        scan=scan,
        prune=sync_options.prune,
        scope=sync_options.scope,
        max_delete=sync_options.max_delete,
        replace=sync_options.replace,
        pause=runner.sleep,
        fresh_s=opened.session.hooks.fresh_s,
        saved=sync_saved.written_names(reviewed) if reviewed is not None else None,
    )
    the_rounds.start(listing, listed_at, named)
    try:
        header = opened.header(scan, plan=the_plan.counts)
        return await opened.record(header, the_rounds.run(the_plan), progress)
    finally:
        the_rounds.close()  # the view's and the later listings' files


async def _confirmed(
    opened: Opened,
    sync_options: SyncOptions,
    scan: Scan,
    the_plan: reconcile.SyncPlan,
    groups: Mapping[str, Listed],
) -> bool:
    """At a terminal, a plan that deletes or replaces is shown and must be answered `yes`."""
    changes = reconcile.iter_changes(the_plan, spool.read(scan), groups)
    for line in render.render_text(the_plan, changes, list_kept=sync_options.verbose):
        print(line, file=sys.stderr)
    n, r = len(the_plan.deletes), len(the_plan.replaces)
    what = [f"{n} {'group' if n == 1 else 'groups'} will be deleted"] if n else []
    what += [f"{r} {'group' if r == 1 else 'groups'} replaced (deleted, then created)"] if r else []
    return await confirm.ask_yes(
        f"{' and '.join(what)}. Type yes to carry out this plan: ", sys.stderr
    )
