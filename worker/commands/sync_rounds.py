"""`worker sync`'s rounds: write the difference, list again, write what is still different.

    list -> plan -> writes (creates, updates) -> [list again if older than FRESH_S]
         -> deletes -> re-creates -> list -> compare -> ... at most rounds.MAX_ROUNDS rounds

A replace (--replace-conflicts) is a delete sent with the deletes, from a listing at most
FRESH_S old, and a create sent only after that delete was answered: its ledger shows the
delete half before the create half, so a run killed between them reads "deleted" for the
Name and the next `run` or `sync` creates it (never a group lost, never one in two
projects).

A sync with nothing to do ends after its one listing. Otherwise it ends with exit 0 only
when a listing made after its last write shows every manifest group as the manifest says
and no extra inside the prune scope (writes answered 2xx that a lagging listing does not
show yet count as done: rounds.Convergence says when they stop counting), else with
StillDifferent (exit 3) naming what is. Every round's writes go through the one runner and
its ledger: one header per invocation, one result per write.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import assert_never

import structlog

from worker.api.account import Listed, Listing
from worker.api.listed_store import NameSet, read_ahead
from worker.commands import paging
from worker.errors import StillDifferent
from worker.ledger.records import Action, Outcome, Record, Result
from worker.manifest import spool
from worker.manifest.values import Group, Invalid, Scan, name_of
from worker.plan import reconcile, rounds
from worker.runner.dispatch import Journal, Runner
from worker.runner.tally import Tally
from worker.runner.work import Work
from worker.session import invalid_line, unsent

log = structlog.get_logger("worker")

WRITES_AHEAD = 50  # Names read ahead per query in a pass that feeds the runner (~0.5 ms)

# A manifest group planned as one of these is still to be written.
_TO_WRITE = (reconcile.Create, reconcile.Update, reconcile.Replace)


class Witness:
    """The runner's journal: the ledger, and each write's result told to the rounds
    (synchronously, in the same call that records it)."""

    def __init__(self, book: Journal, on_result: Callable[[Result], None]) -> None:
        self._book = book
        self._on_result = on_result

    def append(self, record: Record) -> None:
        self._book.append(record)
        if isinstance(record, Result):
            self._on_result(record)

    def sync(self) -> None:
        self._book.sync()


@dataclass(slots=True, kw_only=True)
class Rounds:
    """One sync invocation's rounds over one runner."""

    runner: Runner
    scan: Scan
    prune: bool
    scope: reconcile.Scope
    max_delete: int
    pause: Callable[[float], Awaitable[None]]
    replace: bool = False
    fresh_s: float = rounds.FRESH_S
    conv: rounds.Convergence = field(init=False)
    listed_at: float = 0.0
    deleted: int = 0  # deletes sent over all rounds, against --max-delete
    # `sync --plan`: the Names the saved plan writes; no round writes any other (None: any).
    saved: frozenset[str] | None = None
    unplanned: set[str] = field(default_factory=set)  # differences the saved plan leaves
    _planned: dict[str, tuple[Listed | None, Listed | None]] = field(default_factory=dict)
    _replacing: dict[str, Listed] = field(default_factory=dict)  # delete half sent
    _recreate: set[str] = field(default_factory=set)  # delete half answered: create next
    _listing: Listing | None = None  # the latest listing this round made (`conv.last`)
    _named: NameSet | None = None  # every Name the manifest gives (the caller's: `start`)
    # Every Name a round found not in sync (to write, in conflict, invalid, outside a saved
    # plan); None past rounds.DIFFERED_MAX. With `conv.differed`, what a later round reads.
    _touched: set[str] | None = field(default_factory=set)

    @property
    def replacing(self) -> Callable[[Listed], bool] | None:
        """Which of the account's groups in another project may be replaced."""
        return self.scope.contains if self.replace else None

    def start(self, listing: Listing, listed_at: float, named: NameSet) -> None:
        """Begin from the first listing. `named`: every Name the manifest gives, gathered by
        the first plan's pass (the caller closes it, after the rounds)."""
        self._named = named
        self.conv = rounds.Convergence(listing.groups, whole=listing.whole)
        self.listed_at = listed_at
        book = self.runner.ledger
        assert book is not None
        self.runner.ledger = Witness(book, self._on_result)

    def _on_result(self, result: Result) -> None:
        name = result.name
        if name is None or result.action is None:
            if name is not None:
                self.conv.settled.add(name)  # an invalid line
            return
        match result.outcome:
            case Outcome.CREATED | Outcome.UPDATED | Outcome.DELETED:
                before, after = self._planned.get(name, (None, None))
                self.conv.wrote(name, before, after)
                if result.action is Action.DELETE and name in self._replacing:
                    self._recreate.add(name)
            case Outcome.EXISTS:
                self.conv.answered_exists(name)
            case Outcome.REJECTED | Outcome.CONFLICT | Outcome.INVALID:
                self.conv.settled.add(name)
            case Outcome.VANISHED | Outcome.DEFERRED:
                pass  # the next listing decides
            case _:
                assert_never(result.outcome)

    async def run(self, first: reconcile.SyncPlan) -> Tally:
        """Round after round until a listing shows the manifest, or StillDifferent."""
        plan, pending = first, list[str]()
        for round_no in range(1, rounds.MAX_ROUNDS + 2):
            if round_no > 1:
                self.unplanned.clear()  # what the latest listing shows decides
                plan, pending = self._plan_and_pending()
                pending = self._within_saved(pending)
                if not pending and not plan.deletes and not self.conv.exists:
                    if self.unplanned:
                        raise self._outside_saved()
                    return self.runner.tally
                if round_no > rounds.MAX_ROUNDS:
                    raise self._still_different(pending, plan)
            if round_no == 1 or pending or plan.deletes:
                await self.runner.apply(self._upserts(first if round_no == 1 else None))
                if not self.runner.controls.draining:
                    await self._deletes(plan)
                if self.runner.controls.draining:
                    return self.runner.tally
            if round_no == 1 and self.runner.sent_writes == 0 and not self.conv.exists:
                return self.runner.tally  # nothing to do: one listing
            if round_no > 1:
                await self.pause(rounds.ROUND_PAUSE_S)
                if self.runner.controls.draining:
                    return self.runner.tally
            await self._observe()
            log.info("sync.round", round=round_no, **repr_counts(self.conv))
        raise AssertionError("unreachable: the last round raises or returns")

    def _plan_and_pending(self) -> tuple[reconcile.SyncPlan, list[str]]:
        """`_plan`, and from the same pass over the manifest the groups not shown as the
        manifest says: to write, or (in place only by an older listing's word) to be shown
        by the next listing. Settled groups and those answered Exist are not pending."""
        pending: list[str] = []
        conv = self.conv

        def note(item: Group, change: reconcile.GroupChange) -> None:
            name = item.name
            if name in conv.settled or name in conv.exists:
                return
            if conv.unconfirmed(name) or isinstance(change, _TO_WRITE):
                pending.append(name)

        return self._plan(note), pending

    def _plan(
        self, on_group: Callable[[Group, reconcile.GroupChange], None] | None = None
    ) -> reconcile.SyncPlan:
        """Deletes from the account as known now. Every manifest line takes part, so no
        Name the manifest gives (settled or not) is ever an extra."""
        account = self.conv.effective()
        allowed = max(0, self.max_delete - self.deleted)
        the_plan = reconcile.plan_sync(
            self._manifest(),
            account,
            prune=self.prune,
            scope=self.scope,
            max_delete=1 << 62,
            replace=self.replace,
            on_group=on_group,
            named=self.named(),
        )
        # Deletes only from the latest listing: the view may keep an extra that an older,
        # moved listing showed and that is gone (or re-created elsewhere) since. A replace
        # deletes only what the latest listing shows in the project it was planned from.
        seen = self.conv.last
        deletes = tuple(d for d in the_plan.deletes if d.name in seen)
        replaces = tuple(
            r for r in the_plan.replaces if r.name in seen and seen[r.name].project == r.project
        )
        if self.saved is not None:
            self.unplanned.update(x.name for x in (*deletes, *replaces) if x.name not in self.saved)
            deletes = tuple(d for d in deletes if d.name in self.saved)
            replaces = tuple(r for r in replaces if r.name in self.saved)
        if len(deletes) + len(replaces) > allowed:
            more = len(deletes) + len(replaces)
            log.warning("sync.max_delete_reached", allowed=allowed, more=more)
            replaces = replaces[:allowed]
            deletes = deletes[: allowed - len(replaces)]
        if (deletes, replaces) != (the_plan.deletes, the_plan.replaces):
            the_plan = dataclasses.replace(the_plan, deletes=deletes, replaces=replaces)
        return the_plan

    def _lines(self, *accounts: Mapping[str, Listed]) -> Iterator[Group | Invalid]:
        """The manifest again, its Names read ahead from `accounts` a few at a time: the
        writes pass runs between a send's admission and its first byte on the wire (the
        dispatcher pulls the next item at once), so a read ahead of 1000 Names (5-15 ms)
        there delays a send admitted on time and bunches it with the next."""
        return read_ahead(self._manifest(), name_of, *accounts, batch=WRITES_AHEAD)

    def _manifest(self) -> Iterator[Group | Invalid]:
        """The manifest's lines a round must look at. After the first listing, every line:
        the first plan and the first writes pass saw them all. Once a listing came after
        it, only the lines some round found not in sync, those a listing showed differently
        from the one before (`conv.differed`), those answered or written here, and invalid
        ones: any other line was in sync by the first listing, and every listing since has
        shown its group the same, so it is in sync and shown now. A round's plan then counts
        only what it read; its deletes come from the account, never from these lines."""
        check = self._to_check()
        if check is None:
            return spool.read(self.scan)
        return (
            item if isinstance(item, Invalid) else item.group()
            for item in spool.read_lazily(self.scan)
            if isinstance(item, Invalid) or item.name in check
        )

    def _to_check(self) -> set[str] | None:
        """The Names `_manifest` keeps, or None: every line."""
        conv, touched = self.conv, self._touched
        if conv.listings < 2 or conv.differed is None or touched is None:
            return None
        return (
            touched
            | conv.differed
            | conv.exists
            | conv.settled
            | conv.credits.keys()
            | self._planned.keys()
            | self._replacing.keys()
        )

    def _touch(self, name: str) -> None:
        touched = self._touched
        if touched is not None:
            touched.add(name)
            if len(touched) > rounds.DIFFERED_MAX:
                self._touched = None

    async def _observe(self) -> None:
        listing, began = await paging.list_once(self.runner)
        try:
            relevant = self._relevant(listing.groups)
            self.conv.observe(listing.groups, whole=listing.whole, relevant=relevant)
        except BaseException:
            listing.close()
            raise
        if self._listing is not None:
            self._listing.close()  # `last` is the new one now: the old one's file goes
        self._listing = listing
        self.listed_at = began
        if self.conv.foreign:
            log.warning(
                "sync.foreign_changes",
                names=rounds.still_different(self.conv.foreign, len(self.conv.foreign)),
                hint="another party changes these groups too; written states are "
                "trusted only once a listing shows them",
            )

    def close(self) -> None:
        """Remove the view and the listings this round made (their files). Idempotent."""
        if self._listing is not None:
            self._listing.close()
        conv = getattr(self, "conv", None)  # not there before `start`
        if conv is not None:
            conv.close()

    def _relevant(self, new: Mapping[str, Listed]) -> rounds.Relevant:
        scope = self.scope.contains if self.prune else None
        return rounds.Relevant(self.named(), self.conv.view, new, scope)

    def named(self) -> NameSet:
        """Every Name the manifest gives (names_of), on disk: the first plan gathered them."""
        assert self._named is not None, "Rounds.start first"
        return self._named

    def _upserts(self, plan: reconcile.SyncPlan | None) -> Iterator[Work | Result]:
        """Creates and updates against the account as known now; in the first round (`plan`:
        the first plan) also conflicts and invalid lines as results (later rounds report
        only new conflicts). The first round reads the manifest only as far as that plan's
        last change: past it every line was in sync (the pass would find nothing to send,
        and its tail would sit between the last write and the listing that checks it)."""
        first = plan is not None
        account = self.conv.effective()
        if plan is not None:
            self.runner.tally.skipped["in_sync"] += plan.in_sync
        for item in self._lines(account):
            if plan is not None and item.line > plan.last_change:
                return
            if isinstance(item, Invalid):
                if first:
                    yield invalid_line(self.runner, item)
                continue
            if item.name in self.conv.settled or item.name in self.conv.exists:
                continue
            change = reconcile.classify_group(item, account, replacing=self.replacing)
            if not isinstance(change, reconcile.InSync):
                self._touch(item.name)
            unplanned = self.saved is not None and item.name not in self.saved
            if unplanned and isinstance(change, reconcile.Create | reconcile.Update):
                self.unplanned.add(item.name)
                continue  # moved during the apply: a new plan's business
            match change:
                case reconcile.Create():
                    self._planned[item.name] = (None, _wanted(item, None))
                    yield _work(Action.CREATE, item, item.body)
                case reconcile.Update():
                    self._planned[item.name] = (change.listed, _wanted(item, change.listed))
                    yield _work(Action.UPDATE, item, reconcile.update_body(item))
                case reconcile.Conflict():
                    yield unsent(
                        self.runner,
                        item.name,
                        item.line,
                        Outcome.CONFLICT,
                        "ProjectConflict",
                        f"the account's group is in project {change.listed.project!r}, "
                        f"the manifest says {change.manifest_project!r}; a project "
                        "cannot be changed after creation",
                        fingerprint=item.fingerprint,
                    )
                case reconcile.Replace():
                    pass  # its delete goes with the deletes, from a fresh listing
                case reconcile.InSync():
                    pass  # counted from the first plan
                case _:
                    assert_never(change)

    async def _deletes(self, plan: reconcile.SyncPlan) -> None:
        """The plan's deletes, each sent only while the listing that showed it is at most
        `fresh_s` old: a listing older than that is made again first. Then the creates of
        the replaces whose delete was answered."""
        if not plan.deletes and not plan.replaces:
            return
        if not rounds.fresh(self.listed_at, self.runner.clock(), self.fresh_s):
            log.info(
                "sync.relist_before_deletes", age_s=round(self.runner.clock() - self.listed_at, 1)
            )
            await self._observe()
            plan = self._plan()
        self._replacing = {listed.name: listed for listed in plan.replaces}
        await self.runner.apply(self._delete_items((*plan.replaces, *plan.deletes)))
        if self._recreate and not self.runner.controls.draining:
            await self.runner.apply(self._recreates())

    def _recreates(self) -> Iterator[Work]:
        """The create half of each replace whose delete half was answered: in the manifest's
        project, planned from the group deleted (a lagging listing may still show it)."""
        for item in spool.read(self.scan):
            if isinstance(item, Group) and item.name in self._recreate:
                self._recreate.discard(item.name)
                self._planned[item.name] = (self._replacing[item.name], _wanted(item, None))
                yield _work(Action.CREATE, item, item.body)

    def _delete_items(self, deletes: tuple[Listed, ...]) -> Iterator[Work]:
        for listed in deletes:
            if not rounds.fresh(self.listed_at, self.runner.clock(), self.fresh_s):
                log.info("sync.deletes_postponed", reason="the listing grew older than fresh_s")
                return  # the next round lists again and deletes from that listing
            self._planned[listed.name] = (listed, None)
            self.deleted += 1
            yield Work(
                action=Action.DELETE,
                name=listed.name,
                line=0,
                fingerprint=None,
                body=reconcile.delete_body(listed.name),
            )

    def _still_different(self, pending: list[str], plan: reconcile.SyncPlan) -> StillDifferent:
        names = [*sorted(pending), *sorted(self.conv.exists)]
        names += [listed.name for listed in plan.deletes]
        total = len(names)
        return StillDifferent(
            f"after {rounds.MAX_ROUNDS} rounds the account still differs from the manifest "
            f"in {total} groups: {rounds.still_different(names, total)}"
            + (
                f"; another party changed {len(self.conv.foreign)} of them meanwhile"
                if self.conv.foreign
                else ""
            )
            + "; run sync again"
        )

    def _within_saved(self, pending: list[str]) -> list[str]:
        """`sync --plan`: the pending Names the saved plan holds; the others are noted."""
        if self.saved is None:
            return pending
        self.unplanned.update(n for n in pending if n not in self.saved)
        return [n for n in pending if n in self.saved]

    def _outside_saved(self) -> StillDifferent:
        names = sorted(self.unplanned)
        return StillDifferent(
            f"the saved plan was carried out, but the account moved meanwhile: "
            f"{len(names)} groups differ that the plan does not hold: "
            f"{rounds.still_different(names, len(names))}; make a new plan (or run sync)"
        )


def repr_counts(conv: rounds.Convergence) -> dict[str, int]:
    return {
        "credits": len(conv.credits),
        "confirmed": conv.confirmed,
        "exists_unlisted": len(conv.exists),
        "foreign": len(conv.foreign),
        "listings": conv.listings,
    }


def _wanted(group: Group, listed: Listed | None) -> Listed:
    payload = reconcile.group_payload(group)
    project = listed.project if listed is not None else str(payload["ProjectName"])
    tags = tuple((t["Key"], t["Value"], t["Category"]) for t in payload.get("Tags", ()))
    return Listed(name=group.name, project=project, tags=tags)


def _work(action: Action, item: Group, body: bytes) -> Work:
    return Work(
        action=action, name=item.name, line=item.line, fingerprint=item.fingerprint, body=body
    )
