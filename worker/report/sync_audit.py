"""What a ledger holding a sync says beyond each Name's latest word (for `report`): every
result of every run by "action/outcome", the Names deleted and those found already gone (a
delete answered ResourceNotFound: a lagging listing showed a group deleted already), each
standing conflict's message (the sync's words name both projects), and what the last run,
if it is a finished sync, recorded and whether it checked the account (exit 0).

One streaming pass over the ledger's records (`audit_of`); `Audit.in_sync` is pure.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Final

from worker.api.spec import NOT_FOUND
from worker.errors import Exit
from worker.ledger.records import NEEDS_FIX, Action, Intent, Latest, Outcome, Record, Result
from worker.ledger.state import State

DELETED_LISTED: Final = 1000  # deleted Names listed in --json (the count covers them all)
CONFLICTS_KEPT: Final = 10_000  # conflict messages the audit holds (beyond: a generic reason)


@dataclass(frozen=True, slots=True, kw_only=True)
class Audit:
    """What the results say beyond each Name's latest word, for a ledger holding a sync:
    counts per "action/outcome" over every result of every run, the Names deleted and found
    already gone, each standing conflict's message, and, when the last run is a sync that
    went through every item, which Names it recorded and whether it checked the account."""

    actions: Mapping[str, int] = field(default_factory=dict)
    deleted: int = 0  # results `delete/deleted` answered OK, in every run
    deleted_names: tuple[str, ...] = ()  # the first DELETED_LISTED of them, in ledger order
    gone: int = 0  # deletes answered ResourceNotFound: the group was already gone
    gone_names: tuple[str, ...] = ()  # the first DELETED_LISTED of them
    # Name -> the message of its latest result, while that is a conflict (the sync's words
    # name both projects); at most CONFLICTS_KEPT.
    conflicts: Mapping[str, str] = field(default_factory=dict)
    # hash() of each Name the last run recorded; None unless that run is a finished sync.
    # Hashes, not Names: a sync of millions of lines keeps 8 bytes a Name, not a str.
    last_sync_recorded: frozenset[int] | None = None
    # The last run is a finished sync that exited 0: it checked the account against every
    # line of its manifest, so no line of it is left pending or in doubt.
    last_sync_checked: bool = False

    def in_sync(self, name: str, entry: Latest | None) -> bool:
        """The last run, a finished sync, found `name`'s line as the manifest says without
        writing: it recorded nothing for it (a word of an earlier run is older than that
        sync's listing), or it checked the account at its end and the ledger's word is one
        a later look can settle (in doubt, deferred, vanished)."""
        if self.last_sync_recorded is None:
            return False
        if hash(name) not in self.last_sync_recorded:
            return True
        # A word that needs a human (conflict, rejected, invalid) never comes with exit 0;
        # should one, it is kept: the check cannot have settled it.
        return self.last_sync_checked and (
            entry is None or not (entry.done or entry.outcome in NEEDS_FIX)
        )

    def unchecked(self) -> Audit:
        """This audit for a manifest the last run did not use: its sync says nothing of it."""
        return replace(self, last_sync_recorded=None, last_sync_checked=False)


def has_sync(state: State) -> bool:
    return any(h.command == "sync" for h in state.runs)


def finished_sync(state: State) -> bool:
    """The last run is a sync whose footer says it went through every item."""
    header, footer = state.header, state.footer
    return (
        header is not None
        and header.command == "sync"
        and footer is not None
        and footer.stopped_by is None
    )


def already_gone(action: Action | None, outcome: Outcome | None, code: str) -> bool:
    """A delete answered ResourceNotFound: a lagging listing showed a group already gone."""
    return action is Action.DELETE and outcome is Outcome.DELETED and code == NOT_FOUND


def audit_of(state: State, records: Iterable[Record]) -> Audit:
    """Fold the ledger's records (a streaming pass) into an Audit for `state`."""
    last = state.header.run_id if finished_sync(state) and state.header is not None else None
    actions: Counter[str] = Counter()
    counts = {"deleted": 0, "gone": 0}
    listed: dict[str, list[str]] = {"deleted": [], "gone": []}
    conflicts: dict[str, str] = {}
    recorded: set[int] = set()
    for record in records:
        if isinstance(record, Result):
            gone = already_gone(record.action, record.outcome, record.code)
            shown = "already_gone" if gone else record.outcome
            actions[f"{record.action or 'none'}/{shown}"] += 1
            if record.action is Action.DELETE and record.outcome is Outcome.DELETED:
                kind = "gone" if gone else "deleted"
                counts[kind] += 1
                if len(listed[kind]) < DELETED_LISTED and record.name is not None:
                    listed[kind].append(record.name)
            if record.outcome is Outcome.CONFLICT and record.name is not None:
                if record.name in conflicts or len(conflicts) < CONFLICTS_KEPT:
                    conflicts[record.name] = record.message
            elif record.outcome is not Outcome.INVALID and record.name is not None:
                conflicts.pop(record.name, None)  # a later word; an invalid line hides none
        if (
            last is not None
            and isinstance(record, Intent | Result)
            and record.run_id == last
            and record.name is not None
        ):
            recorded.add(hash(record.name))
    footer = state.footer
    return Audit(
        actions=dict(sorted(actions.items())),
        deleted=counts["deleted"],
        deleted_names=tuple(listed["deleted"]),
        gone=counts["gone"],
        gone_names=tuple(listed["gone"]),
        conflicts=conflicts,
        last_sync_recorded=frozenset(recorded) if last is not None else None,
        last_sync_checked=last is not None and footer is not None and footer.exit_code == Exit.OK,
    )
