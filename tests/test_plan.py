"""One meaning of the ledger: every word any command writes, as `run` plans on it and as
`report` prints it (the table; the CLI side is in test_ledger_meaning_cli.py)."""

from __future__ import annotations

import pytest

from worker.ledger.records import Action, Latest, Outcome
from worker.manifest.values import Group
from worker.plan import run_plan
from worker.report.status import status_given

F1, F2 = "1" * 64, "2" * 64

# Every (action, outcome) a command records for a Name: `run` creates; `sync` creates,
# updates, deletes, and records a conflict or an invalid line without an action.
WRITTEN = {
    "run": [
        (Action.CREATE, Outcome.CREATED),
        (Action.CREATE, Outcome.EXISTS),
        (Action.CREATE, Outcome.REJECTED),
        (Action.CREATE, Outcome.DEFERRED),
        (Action.CREATE, None),  # an intent with no result: in doubt
        (None, Outcome.INVALID),
    ],
    "sync": [
        (Action.CREATE, Outcome.CREATED),
        (Action.CREATE, Outcome.EXISTS),
        (Action.CREATE, Outcome.REJECTED),
        (Action.CREATE, Outcome.DEFERRED),
        (Action.CREATE, None),
        (Action.UPDATE, Outcome.UPDATED),
        (Action.UPDATE, Outcome.VANISHED),
        (Action.UPDATE, Outcome.REJECTED),
        (Action.UPDATE, Outcome.DEFERRED),
        (Action.UPDATE, None),
        (Action.DELETE, Outcome.DELETED),
        (Action.DELETE, Outcome.REJECTED),
        (Action.DELETE, Outcome.DEFERRED),
        (Action.DELETE, None),
        (None, Outcome.CONFLICT),
        (None, Outcome.INVALID),
    ],
}
PAIRS = [(cmd, action, outcome) for cmd, words in WRITTEN.items() for action, outcome in words]

# What `run` does on the latest word: (line unchanged, line changed since), and with
# --retry-rejected. Written out, not derived: this is the contract.
RUN_READS: dict[Outcome | None, tuple[str, str]] = {
    Outcome.CREATED: ("done", "done_changed"),
    Outcome.EXISTS: ("done", "done_changed"),
    Outcome.UPDATED: ("done", "done_changed"),
    Outcome.DELETED: ("deleted", "deleted"),
    Outcome.VANISHED: ("vanished", "vanished"),
    Outcome.CONFLICT: ("conflict", "conflict"),
    Outcome.REJECTED: ("rejected_unchanged", "fixed"),
    Outcome.DEFERRED: ("deferred", "deferred"),
    Outcome.INVALID: ("fixed", "fixed"),
    None: ("in_doubt", "in_doubt"),
}
SKIPS = {"done", "done_changed", "rejected_unchanged"}

# What `report` prints for the line (status), pair by pair, so a change to it is seen.
REPORT_READS: dict[Outcome | None, tuple[str, str]] = {
    Outcome.CREATED: ("created", "created"),
    Outcome.EXISTS: ("exists", "exists"),
    Outcome.UPDATED: ("updated", "updated"),
    # The line asks for the group and the ledger says it is gone: the next run creates it.
    Outcome.DELETED: ("pending", "pending"),
    Outcome.VANISHED: ("vanished", "pending"),
    Outcome.CONFLICT: ("conflict", "pending"),  # "pending": the line changed since
    Outcome.REJECTED: ("rejected", "pending"),
    Outcome.DEFERRED: ("deferred", "pending"),
    Outcome.INVALID: ("pending", "pending"),
    None: ("in_doubt", "in_doubt"),
}


def word(action: Action | None, outcome: Outcome | None, fp: str | None) -> Latest:
    return Latest(
        outcome=outcome,
        action=action,
        fp=bytes.fromhex(fp) if fp is not None else None,
        code="",
        line=1,
    )


def recorded_fp(action: Action | None, outcome: Outcome | None) -> str | None:
    """The fingerprint a command records with the word: none for deletes and invalid lines,
    the line's for the rest (a conflict too: `report` tells whether the line changed since)."""
    if action is Action.DELETE or (action is None and outcome is not Outcome.CONFLICT):
        return None
    return F1


@pytest.mark.parametrize(("writer", "action", "outcome"), PAIRS)
@pytest.mark.parametrize("changed", [False, True])
def test_run_reads_every_word_every_command_writes(
    writer: str, action: Action | None, outcome: Outcome | None, changed: bool
) -> None:
    """`run` skips a Name only when the latest word says the account holds it (created,
    exists, updated), whoever wrote it; deleted, vanished and conflict send it again."""
    fp = recorded_fp(action, outcome)
    item = Group(name="A", line=1, body=b"{}", fingerprint=F2 if changed else F1)
    unchanged_key, changed_key = RUN_READS[outcome]
    # A word without a fingerprint (a delete, a conflict) can never match the line.
    want = changed_key if changed or fp is None else unchanged_key
    got = run_plan.decide(item, {"A": word(action, outcome, fp)})
    assert (got.do, got.why) == (run_plan.Do.SKIP if want in SKIPS else run_plan.Do.SEND, want)
    assert (want in run_plan.SENDS) is (got.do is run_plan.Do.SEND)


@pytest.mark.parametrize(("writer", "action", "outcome"), PAIRS)
def test_retry_rejected_changes_only_an_unchanged_rejected_line(
    writer: str, action: Action | None, outcome: Outcome | None
) -> None:
    """--retry-rejected sends an unchanged rejected line again and changes nothing else."""
    fp = recorded_fp(action, outcome)
    item = Group(name="A", line=1, body=b"{}", fingerprint=F1)
    known = {"A": word(action, outcome, fp)}
    plain, retried = run_plan.decide(item, known), run_plan.decide(item, known, retry_rejected=True)
    if outcome is Outcome.REJECTED and fp == F1:
        assert (retried.do, retried.why) == (run_plan.Do.SEND, "retry_rejected")
    else:
        assert retried == plain


@pytest.mark.parametrize(("writer", "action", "outcome"), PAIRS)
@pytest.mark.parametrize("changed", [False, True])
def test_report_reads_every_word_as_run_does(
    writer: str, action: Action | None, outcome: Outcome | None, changed: bool
) -> None:
    """The status `report` gives a manifest line for each word: it agrees with `run` on what
    is done (a deleted group is pending, as run sends it again)."""
    fp = recorded_fp(action, outcome)
    item = Group(name="A", line=1, body=b"{}", fingerprint=F2 if changed else F1)
    unchanged, after_change = REPORT_READS[outcome]
    want = after_change if changed or (fp is None and outcome is not Outcome.DELETED) else unchanged
    status, _ = status_given(item, word(action, outcome, fp), None)
    assert status == want


def test_every_reason_is_a_send_or_a_skip_and_has_words() -> None:
    """Each reason `decide` can give is explained, and is counted as sent or skipped."""
    given = {k for pair in RUN_READS.values() for k in pair} | {"new", "retry_rejected"}
    assert given | {"invalid"} == set(run_plan.REASONS)
    assert set(run_plan.SENDS) == given - SKIPS
