"""Plan step for `run`: given a manifest line and what the ledger says, what to do. Pure.

One meaning of the ledger for every command: a Name is done for `run` only when the
ledger's latest word says the account holds it (`created`, `exists`, `updated`). A word
written by `sync` that says the account does not hold it (`deleted`, `vanished`, or
`conflict`: held in another project) sends it again, like `deferred`; `rejected` waits for
a changed line or --retry-rejected, whoever wrote it. (`sync` plans from the account
itself, so no ledger word changes what it does: see reconcile.py.)
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from worker.ledger.records import Latest, Outcome
from worker.manifest.values import Group, Invalid


class Do(enum.Enum):
    SEND = "send"
    SKIP = "skip"
    RECORD_INVALID = "record-invalid"


# Why, as the plan and the logs say it. The key is also the counter name in `Plan.counts`.
REASONS = {
    "new": "not in the ledger",
    "deferred": "deferred by an earlier run: trying again",
    "in_doubt": "sent by an earlier run that did not record an answer: sending again "
    "(an 'already exists' answer confirms it)",
    "fixed": "rejected or invalid before and the line has changed since",
    "deleted": "deleted by an earlier sync (--prune): sending again",
    "vanished": "gone when an earlier sync updated it: sending again",
    "conflict": "in another project when an earlier sync looked: sending again "
    "(an 'already exists' answer confirms it is there)",
    "done": "already created",
    "done_changed": "drift: created by an earlier run, and the line has changed since; "
    "create does not update a group: run `worker sync` to make the account match",
    "retry_rejected": "rejected before; sending again (--retry-rejected)",
    "rejected_unchanged": "rejected before and the line is unchanged: fix it, or pass "
    "--retry-rejected once the cause is fixed",
    "invalid": "invalid manifest line",
}


# The words that say the account holds the group (as the line says, when the fingerprint is
# the line's). Not records.DONE: `deleted` finishes a delete, but the group is gone.
HELD: Final = frozenset({Outcome.CREATED, Outcome.EXISTS, Outcome.UPDATED})
# Words that say the account does not hold it here, each with its reason to send again.
GONE: Final = {
    Outcome.DELETED: "deleted",
    Outcome.VANISHED: "vanished",
    Outcome.CONFLICT: "conflict",
}


@dataclass(frozen=True, slots=True)
class Decision:
    do: Do
    why: str  # a key of REASONS


def decide(
    item: Group | Invalid, latest: Mapping[str, Latest], *, retry_rejected: bool = False
) -> Decision:
    if isinstance(item, Invalid):
        return INVALID
    return decide_on(latest.get(item.name), item.fingerprint, retry_rejected=retry_rejected)


def decide_on(prev: Latest | None, fingerprint: str, *, retry_rejected: bool = False) -> Decision:
    """The decision for a valid line whose fingerprint is `fingerprint`, given the ledger's
    latest word on its Name (`prev`)."""
    if prev is None:
        return _NEW
    if prev.outcome is None:  # in doubt
        return _IN_DOUBT
    outcome = prev.outcome
    changed = prev.fp is None or prev.fp.hex() != fingerprint
    if outcome in HELD:
        return _DONE_CHANGED if changed else _DONE
    if outcome in GONE:
        return Decision(Do.SEND, GONE[outcome])
    if outcome == Outcome.REJECTED and not changed:
        if retry_rejected:
            return Decision(Do.SEND, "retry_rejected")
        return Decision(Do.SKIP, "rejected_unchanged")
    if outcome in (Outcome.REJECTED, Outcome.INVALID):
        return Decision(Do.SEND, "fixed")
    return Decision(Do.SEND, "deferred")


# The decisions most lines get, made once (a Decision is a frozen value).
INVALID: Final = Decision(Do.RECORD_INVALID, "invalid")
_NEW: Final = Decision(Do.SEND, "new")
_IN_DOUBT: Final = Decision(Do.SEND, "in_doubt")
_DONE: Final = Decision(Do.SKIP, "done")
DONE_DECISION: Final = _DONE  # what decide_on returns for a line done as it is (ahead.py)
_DONE_CHANGED: Final = Decision(Do.SKIP, "done_changed")


@dataclass(slots=True)
class Plan:
    """Counts of decisions, for --dry-run and the run's opening line."""

    counts: Counter[str]

    @property
    def to_send(self) -> int:
        return sum(self.counts[k] for k in SENDS)

    def lines(self) -> list[str]:
        """One line per reason that occurs, in REASONS' order (what is sent first)."""
        return [
            f"{self.counts[k]:>8}  {k:<18} {why}" for k, why in REASONS.items() if self.counts[k]
        ]


# Lines `run` cannot make true: the group exists with other content. They end the run in
# exit 6 (drift), below 1 and 3 (session.outcome_exit): fixing a line, or sending what is
# still deferred, comes before `worker sync`.
DRIFT: Final = ("done_changed",)
SYNC_HINT: Final = (
    "the account holds these groups with other content than the manifest says; `run` only "
    "creates: run `worker sync` with the same manifest to update them"
)

SENDS = (
    "new",
    "deferred",
    "in_doubt",
    "deleted",
    "vanished",
    "conflict",
    "fixed",
    "retry_rejected",
)


def count(
    items: Iterable[Group | Invalid], latest: Mapping[str, Latest], *, retry_rejected: bool = False
) -> Plan:
    """Decide every line without acting: for --dry-run and the run's opening line."""
    return Plan(Counter(decide(item, latest, retry_rejected=retry_rejected).why for item in items))
