"""Reconcile step (sync): the manifest against the listed account, by Name. Pure.

    manifest  account                        change
    present   absent                         Create(group)
    present   same project, same tag set     InSync(group)
    present   same project, other tag set    Update(group, listed, added, removed)
    present   other project                  Conflict(group, listed): nothing is sent;
                                             Replace(group, listed) with --replace-conflicts
                                             when the account's group is inside the scope
    absent    present                        Delete(listed) with --prune inside the scope,
                                             else Keep(listed, why)

The manifest is streamed, never held: `plan_sync` makes one pass and keeps only the Names it
saw that the account also holds (at most the size of the account, which is in memory
anyway), and from those the extras. `commands/sync.py` re-derives each
Create/Update/Conflict in a second streaming pass with `classify_group` (or `iter_changes`).
Deletes come only from `SyncPlan.deletes`, which by construction holds no Name the manifest
gives, valid or not, and from `SyncPlan.replaces` (the old half of a Replace: the group the
account holds under a manifest Name, in another project). Both count against --max-delete.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from worker.api.account import Listed, Tag
from worker.api.listed_store import NameSet, not_in, read_ahead
from worker.errors import PlanRefused, UsageError
from worker.manifest.values import Group, Invalid, name_of, names_of

DEFAULT_MAX_DELETE: Final = 50


@dataclass(frozen=True, slots=True, kw_only=True)
class Scope:
    """Which extras `--prune` may delete. An extra is in scope when it meets EVERY criterion
    given: with both `--scope-project` and `--scope-match`, its project must be one of those
    named AND its whole Name must match the pattern. No criterion given = no scope."""

    projects: frozenset[str] = frozenset()
    match: re.Pattern[str] | None = None

    @classmethod
    def from_flags(cls, projects: Iterable[str], match: str | None) -> Scope:
        """Build from `--scope-project P`... and `--scope-match REGEX`; UsageError if bad."""
        named = frozenset(projects)
        if "" in named:
            raise UsageError("--scope-project must not be empty")
        if match is None:
            return cls(projects=named)
        if not match:
            raise UsageError("--scope-match must not be empty (it would match no Name)")
        try:
            pattern = re.compile(match)
        except (re.error, OverflowError, RecursionError, ValueError) as exc:
            raise UsageError(
                f"--scope-match {match!r} is not a valid regular expression: {exc}"
            ) from None
        return cls(projects=named, match=pattern)

    @property
    def given(self) -> bool:
        return bool(self.projects) or self.match is not None

    def contains(self, listed: Listed) -> bool:
        if not self.given:
            return False  # no scope is an empty fence, never "everything"
        if self.projects and listed.project not in self.projects:
            return False
        # fullmatch: "--scope-match tmp" must not reach "tmp2" or "mytmp".
        return self.match is None or self.match.fullmatch(listed.name) is not None


@dataclass(frozen=True, slots=True)
class Create:
    group: Group


@dataclass(frozen=True, slots=True)
class Update:
    group: Group
    listed: Listed
    added: tuple[Tag, ...]  # in the manifest, not on the group: sorted
    removed: tuple[Tag, ...]  # on the group, not in the manifest: sorted


@dataclass(frozen=True, slots=True)
class Conflict:
    """ProjectName cannot be changed after creation: reported, nothing sent."""

    group: Group
    listed: Listed

    @property
    def manifest_project(self) -> str:
        return str(group_payload(self.group)["ProjectName"])


@dataclass(frozen=True, slots=True)
class Replace:
    """A Conflict inside the scope, with --replace-conflicts: the account's group is deleted,
    then created again in the manifest's project (Terraform's -replace)."""

    group: Group
    listed: Listed

    @property
    def manifest_project(self) -> str:
        return str(group_payload(self.group)["ProjectName"])


@dataclass(frozen=True, slots=True)
class InSync:
    group: Group


@dataclass(frozen=True, slots=True)
class Delete:
    listed: Listed


@dataclass(frozen=True, slots=True)
class Keep:
    """An extra that stays: `why` is NO_PRUNE or OUT_OF_SCOPE."""

    listed: Listed
    why: str


NO_PRUNE: Final = "not in the manifest; kept (no --prune)"
OUT_OF_SCOPE: Final = "not in the manifest; kept (outside the --prune scope)"

GroupChange = Create | Update | Conflict | Replace | InSync  # what a manifest group needs
Change = GroupChange | Delete | Keep


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncPlan:
    """Counts of every change, and the extras by name. Creates, updates and conflicts are
    counted only: `classify_group` re-derives them while the manifest is streamed again."""

    listed: int  # groups in the account
    create: int
    update: int
    conflict: int
    in_sync: int
    invalid: int  # invalid manifest lines (--skip-invalid); their Names are still protected
    prune: bool
    deletes: tuple[Listed, ...]  # sorted by Name; never a Name the manifest gives
    # Extras not deleted (see `keep_why`), counted only: without --prune they are every
    # other group of the account (10^6 of them as objects would cost ~370 MB);
    # `iter_changes` walks them again from the listing when a renderer wants each one.
    kept: int
    # The account's groups to delete and create again in the manifest's project, sorted by
    # Name (--replace-conflicts; every one a Name the manifest gives, valid).
    replaces: tuple[Listed, ...] = ()
    # The manifest line after which every line is in sync (0: none differs): a sync's first
    # writes pass, which streams the manifest again, stops there instead of reading on.
    last_change: int = 0

    @property
    def removals(self) -> int:
        """Groups the plan deletes, against --max-delete: extras and replaced groups."""
        return len(self.deletes) + len(self.replaces)

    @property
    def counts(self) -> dict[str, int]:
        return {
            "listed": self.listed,
            "create": self.create,
            "update": self.update,
            "conflict": self.conflict,
            "replace": len(self.replaces),
            "in_sync": self.in_sync,
            "delete": len(self.deletes),
            "keep": self.kept,
            "invalid": self.invalid,
        }

    @property
    def keep_why(self) -> str:
        # Every kept extra is kept for the same reason: no --prune, or outside its scope.
        return OUT_OF_SCOPE if self.prune else NO_PRUNE


def require_scope(prune: bool, scope: Scope, *, replace: bool = False) -> None:
    """Refuse `--prune` or `--replace-conflicts` without a scope. Call it before the first
    request (exit 2)."""
    if (prune or replace) and not scope.given:
        flag = "--prune" if prune else "--replace-conflicts"
        raise PlanRefused(
            f"{flag} needs a scope: give --scope-project P (repeatable) and/or "
            "--scope-match REGEX (the whole Name); nothing was sent"
        )


def plan_sync(
    items: Iterable[Group | Invalid],
    account: Mapping[str, Listed],
    *,
    prune: bool = False,
    scope: Scope = Scope(),
    max_delete: int = DEFAULT_MAX_DELETE,
    replace: bool = False,
    on_group: Callable[[Group, GroupChange], None] | None = None,
    named: NameSet | None = None,
    gather: NameSet | None = None,
) -> SyncPlan:
    """One pass over the manifest. Raises PlanRefused for prune or replace without a scope
    and for more than `max_delete` deletes, replaced groups included (exactly `max_delete`
    is allowed). `on_group` is told each valid group's change as the pass classifies it
    (sync's later rounds take what is still pending from the same pass). `named`: the
    manifest's Names (names_of), held by the caller; `gather`: an empty set to fill with them."""
    _refuse_flags(prune, scope, replace, max_delete)
    counts = {Create: 0, Update: 0, Conflict: 0, Replace: 0, InSync: 0, Invalid: 0}
    replaces: list[Listed] = []
    replacing = scope.contains if replace else None
    last_change = 0
    seen = SeenInSync()
    # Every Name the manifest gives, on disk: the extras are the account's groups not in
    # it, found by walking both in Name order (no set of 10^6 Names in memory).
    with contextlib.ExitStack() as owned:
        named, fill = _given_or_new(named, gather, owned)
        for item in read_ahead(items, name_of, account):
            if fill:
                named.update(names_of(item))
            if isinstance(item, Invalid):
                # An invalid line still names its group: never delete what a user listed,
                # under any Name the line could mean (a repeated key, an escape).
                _refuse_unreadable(item, prune)
                counts[Invalid] += 1
                last_change = item.line
                continue
            change = classify_group(item, account, replacing=replacing, seen=seen)
            counts[type(change)] += 1
            if not isinstance(change, InSync):
                last_change = item.line
            if on_group is not None:
                on_group(item, change)
            if isinstance(change, Replace):
                replaces.append(change.listed)
        deletes, kept = _extras(account, named, prune, scope)
    _refuse_over(len(deletes), len(replaces), max_delete)
    return SyncPlan(
        listed=len(account),
        create=counts[Create],
        update=counts[Update],
        conflict=counts[Conflict],
        in_sync=counts[InSync],
        invalid=counts[Invalid],
        prune=prune,
        deletes=tuple(deletes),
        kept=kept,
        replaces=tuple(sorted(replaces, key=lambda listed: listed.name)),
        last_change=last_change,
    )


def _refuse_flags(prune: bool, scope: Scope, replace: bool, max_delete: int) -> None:
    require_scope(prune, scope, replace=replace)
    if max_delete < 0:
        raise UsageError("--max-delete must be >= 0")


def _extras(
    account: Mapping[str, Listed], named: NameSet, prune: bool, scope: Scope
) -> tuple[list[Listed], int]:
    """The account's groups the manifest does not name: those to delete (--prune, in the
    scope), and how many are kept."""
    deletes: list[Listed] = []
    kept = 0
    for listed in not_in(account, named):
        if prune and scope.contains(listed):
            deletes.append(listed)
        else:
            kept += 1
    return deletes, kept


def _given_or_new(
    named: NameSet | None, gather: NameSet | None, owned: contextlib.ExitStack
) -> tuple[NameSet, bool]:
    """The set of the manifest's Names, and whether this pass fills it: the caller's (full
    already), the caller's to fill (`gather`), or a new one to fill and let go."""
    if named is not None:
        return named, False
    if gather is not None:
        return gather, True
    return owned.enter_context(NameSet()), True


def _refuse_unreadable(item: Invalid, prune: bool) -> None:
    """A line whose Name cannot even be read (bad JSON, bad UTF-8) might name any extra."""
    if prune and not item.names:
        raise PlanRefused(
            f"manifest line {item.line} is invalid and has no readable Name, so "
            "--prune cannot tell whether it names a group to keep; fix that line "
            "(nothing was changed)"
        )


def _refuse_over(deletes: int, replaces: int, max_delete: int) -> None:
    if deletes + replaces > max_delete:
        raise PlanRefused(
            f"sync would delete {deletes + replaces} groups"
            + (f" ({replaces} of them to replace)" if replaces else "")
            + f", more than --max-delete {max_delete} allows; nothing was changed "
            "(narrow the scope, or raise --max-delete after checking the plan with --dry-run)"
        )


class SeenInSync:
    """What `classify_group` found in sync, remembered by what decided it: the listed
    project and tags, and the manifest body after its Name. Most groups of a manifest share
    a few projects and tag sets, so a pass over 10^5 lines decodes each body's tags once per
    kind instead of once per line (a fifth of a plan pass). Bounded: a pass with more kinds
    than LIMIT goes on without remembering more."""

    LIMIT: Final = 4096

    def __init__(self) -> None:
        self._seen: set[tuple[str, tuple[Tag, ...], bytes]] = set()

    def __contains__(self, key: object) -> bool:
        return key in self._seen

    def add(self, key: tuple[str, tuple[Tag, ...], bytes]) -> None:
        if len(self._seen) < self.LIMIT:
            self._seen.add(key)


def classify_group(
    group: Group,
    account: Mapping[str, Listed],
    *,
    replacing: Callable[[Listed], bool] | None = None,
    seen: SeenInSync | None = None,
) -> GroupChange:
    """What one manifest group needs, given the account. `replacing` says which of the
    account's groups in another project may be replaced (None: none, they are conflicts).
    `seen`: what earlier calls of one pass found in sync (a shortcut, never another answer)."""
    listed = account.get(group.name)
    if listed is None:
        return Create(group)
    key = None
    if seen is not None:
        # A canonical body is {"Name":…,"ProjectName":…[,"Tags":…]}: what follows the
        # Name is the group's state. A '"' inside a JSON string is always escaped, so the
        # first ',"ProjectName":' is the key itself, whatever the Name holds.
        body = group.body
        at = body.find(b',"ProjectName":')
        key = (listed.project, listed.tags, body[at:]) if at > 0 else None
        if key in seen:
            return InSync(group)
    payload = group_payload(group)
    if payload["ProjectName"] != listed.project:
        if replacing is not None and replacing(listed):
            return Replace(group, listed)
        return Conflict(group, listed)
    wanted = frozenset(_tags_of(payload))
    have = listed.tag_set
    if wanted == have:
        if key is not None and seen is not None:
            seen.add(key)
        return InSync(group)
    return Update(group, listed, tuple(sorted(wanted - have)), tuple(sorted(have - wanted)))


def iter_changes(
    plan: SyncPlan, items: Iterable[Group | Invalid], account: Mapping[str, Listed]
) -> Iterator[Change]:
    """Every change in order: the manifest's (streamed again), then deletes, then the kept
    extras (walked again from the account: the plan only counted them)."""
    replaced = {listed.name for listed in plan.replaces}
    with NameSet() as named:
        for item in read_ahead(items, name_of, account):
            if isinstance(item, Invalid):
                named.update(item.names)
                continue
            named.add(item.name)
            yield classify_group(item, account, replacing=lambda g: g.name in replaced)
        yield from (Delete(listed) for listed in plan.deletes)
        deleted = {listed.name for listed in plan.deletes}
        why = plan.keep_why
        for listed in not_in(account, named):
            if listed.name not in deleted:
                yield Keep(listed, why)


def in_sync(plan: SyncPlan, prune: bool) -> bool:
    """For `--check`: nothing to create, update or resolve; extras count only with --prune
    (and then only those in scope: outside it the manifest does not speak for the account)."""
    # An invalid line (--skip-invalid) names a group the account cannot be shown to match.
    drift = plan.create + plan.update + plan.conflict + len(plan.replaces) + plan.invalid
    if prune:
        drift += len(plan.deletes)
    return drift == 0


def group_payload(group: Group) -> dict[str, Any]:
    payload: dict[str, Any] = orjson.loads(group.body)
    return payload


def _tags_of(payload: Mapping[str, Any]) -> list[Tag]:
    return [(t["Key"], t["Value"], t["Category"]) for t in payload.get("Tags", ())]


def update_body(group: Group) -> bytes:
    """UpdatePullToPushGroup body: the manifest's tags replace the group's (`[]` clears)."""
    tags = group_payload(group).get("Tags", [])
    return orjson.dumps({"Name": group.name, "Tags": tags})


def delete_body(name: str) -> bytes:
    return orjson.dumps({"Name": name})
