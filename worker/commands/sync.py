"""`worker sync`: list the account, compare it with the manifest, carry out the difference.

The account (account.Listing: every group one listing saw, however the account moved under
it) and the manifest meet in reconcile.plan_sync; nothing is written before the plan is
accepted (prune scope, --max-delete). Then sync_rounds carries out the difference, lists
again and corrects what is still different, all under the run's one budget.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import IO

import orjson
import structlog

from worker import __version__, compose
from worker.api.account import Listed
from worker.api.signing import Credentials
from worker.commands.sync_rounds import Rounds, fresh_s_from_env, list_once
from worker.compose import Loop, Options, Published
from worker.errors import Exit, ManifestError
from worker.ledger.journal import Ledger
from worker.ledger.records import RunHeader, Target
from worker.manifest import spool
from worker.manifest.values import Scan
from worker.plan import reconcile
from worker.progress import Progress
from worker.runner.controls import Controls
from worker.runner.dispatch import Runner
from worker.runner.stamps import stamp
from worker.settings import LIMITS, Settings

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


def sync(
    settings: Settings,
    options: Options,
    sync_options: SyncOptions,
    controls: Controls,
    loop: Loop,
    out: IO[str],
) -> Exit:
    """`worker sync`: list the account, compare it with the manifest, carry out the difference."""
    with compose.scan_manifest(settings) as scan:
        if scan.problem_count and not settings.skip_invalid:
            raise ManifestError(scan.problems, scan.problem_count)
        settings, creds, source = compose.load_credentials(settings, options)
        log.info("sync.start", credentials=source)
        target = compose.target_of(settings, creds, options)
        if settings.dry_run or sync_options.check:
            return loop(
                _sync_plan_only(
                    settings, options, sync_options, scan, creds, target, controls, out
                ),
                controls,
            )
        with compose.open_ledger(settings.ledger, target, expect_names=scan.groups) as book:
            compose.remember_manifest(scan, settings)
            return loop(
                _sync(settings, options, sync_options, scan, book, creds, target, controls),
                controls,
            )


async def list_account(runner: Runner) -> Mapping[str, Listed]:
    """One listing under the run's budget: every group it saw (sync_rounds.list_once)."""
    listing, _ = await list_once(runner)
    return listing.groups


async def _sync_plan_only(
    settings: Settings,
    options: Options,
    sync_options: SyncOptions,
    scan: Scan,
    creds: Credentials | None,
    target: Target,
    controls: Controls,
    out: IO[str],
) -> Exit:
    async with (
        compose.account_for(settings, creds, target, options) as account,
        compose.runner_for(
            account, book=None, controls=controls, run_id=uuid.uuid4().hex
        ) as runner,
    ):
        groups = await list_account(runner)
    with compose.before_writes():
        # Plan without the --max-delete fence, so the plan a real sync would refuse can be
        # looked at; the refusal is said below and in the exit code.
        the_plan = _plan(sync_options, scan, groups, max_delete=int(LIMITS["max-delete"].high))
        changes = reconcile.iter_changes(the_plan, spool.read(scan), groups)
        if options.json:
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
        return Exit.OK if reconcile.in_sync(the_plan, sync_options.prune) else Exit.DRIFT
    return Exit.USAGE if refused else Exit.OK


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


async def _sync(
    settings: Settings,
    options: Options,
    sync_options: SyncOptions,
    scan: Scan,
    book: Ledger,
    creds: Credentials | None,
    target: Target,
    controls: Controls,
) -> Exit:
    run_id = uuid.uuid4().hex
    structlog.contextvars.bind_contextvars(run_id=run_id)
    published = compose.Published(options, "sync", settings.pacing.rate)
    published.write()  # during a long listing too
    with published.serving():
        async with (
            compose.account_for(settings, creds, target, options) as account,
            compose.runner_for(
                account, book=book, controls=controls, run_id=run_id, metrics=published.metrics
            ) as runner,
        ):
            return await _sync_in(runner, settings, sync_options, scan, book, target, published)


async def _sync_in(
    runner: Runner,
    settings: Settings,
    sync_options: SyncOptions,
    scan: Scan,
    book: Ledger,
    target: Target,
    published: Published,
) -> Exit:
    listing, listed_at = await list_once(runner)
    groups = listing.groups
    # Nothing is written before the listing is complete and the plan accepted.
    with compose.before_writes():
        the_plan = _plan(sync_options, scan, groups)
    to_send = the_plan.create + the_plan.update + len(the_plan.deletes)
    progress = Progress(
        tty=sys.stderr.isatty(), total=scan.groups + scan.invalid + len(the_plan.deletes)
    )
    runner.on_tick = compose.ticker(progress, published, settings)
    runner.tally.to_send = to_send
    header = RunHeader(
        run_id=runner.run_id,
        started=stamp(runner.wall()),
        version=__version__,
        command="sync",
        target=target,
        manifest=compose.manifest_name(scan.path),
        manifest_sha256=scan.sha256,
        items=scan.groups + scan.invalid,
        plan=the_plan.counts,
        settings=settings.public(),
    )
    the_rounds = Rounds(
        runner=runner,
        scan=scan,
        prune=sync_options.prune,
        scope=sync_options.scope,
        max_delete=sync_options.max_delete,
        pause=runner.sleep,
        fresh_s=fresh_s_from_env(),
    )
    the_rounds.start(listing, listed_at)
    try:
        return await compose.journal(runner, book, header, the_rounds.run(the_plan), published)
    finally:
        progress.close(runner.tally)
