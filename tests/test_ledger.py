"""The ledger: append, reload, torn tails, damage, locking; and the plan built on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from worker import plan
from worker.errors import LedgerError, LedgerLocked, Problem
from worker.ledger import Latest, Ledger, default_path, read_state
from worker.manifest import Group, Invalid


def result(name: str, outcome: str, fingerprint: str = "f1") -> dict[str, Any]:
    return {"type": "result", "name": name, "outcome": outcome, "fingerprint": fingerprint}


def intent(name: str, fingerprint: str = "f1") -> dict[str, Any]:
    return {"type": "intent", "name": name, "fingerprint": fingerprint, "attempt": 1}


def test_default_path_is_beside_the_manifest() -> None:
    """groups.jsonl -> groups.ledger.jsonl in the same folder."""
    assert default_path(Path("/x/groups.jsonl")) == Path("/x/groups.ledger.jsonl")
    assert default_path(Path("list.txt")) == Path("list.txt.ledger.jsonl")


def test_append_and_reload(tmp_path: Path) -> None:
    """What one run appends, the next run reads back, latest word per Name."""
    path = tmp_path / "l.jsonl"
    book = Ledger.open(path)
    book.append({"type": "run", "run_id": "r1"})
    book.append(intent("A"))
    book.append(result("A", "deferred"))
    book.append(intent("A"))
    book.append(result("A", "created"))
    book.append(intent("B"))
    book.close()
    reopened = Ledger.open(path)
    state = reopened.state
    reopened.close()
    assert state.latest["A"].outcome == "created" and state.latest["A"].body is None
    assert state.latest["B"].in_doubt
    assert len(state.runs) == 1


def test_torn_tail_is_cut_off(tmp_path: Path) -> None:
    """A last line without its newline (a crash mid-write) is removed when the ledger opens."""
    path = tmp_path / "l.jsonl"
    book = Ledger.open(path)
    book.append(result("A", "created"))
    book.close()
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"type": "result", "name": "\xe4\xb8')
    assert "A" in read_state(path).latest  # readers skip the torn tail
    book = Ledger.open(path)
    book.close()
    assert path.read_bytes() == whole


def test_damage_in_the_middle_names_the_line(tmp_path: Path) -> None:
    """A broken record that is not the torn tail is an error, not a silent skip."""
    path = tmp_path / "l.jsonl"
    path.write_text('{"type":"result","name":"A","outcome":"created"}\nGARBAGE\n'
                    '{"type":"result","name":"B","outcome":"created"}\n')
    with pytest.raises(LedgerError, match=r"l.jsonl:2: damaged"):
        Ledger.open(path)
    with pytest.raises(LedgerError, match=r":2: damaged"):
        read_state(path)


def test_second_open_is_locked_out(tmp_path: Path) -> None:
    """While one run holds the ledger, another cannot open it; after close it can."""
    path = tmp_path / "l.jsonl"
    first = Ledger.open(path)
    with pytest.raises(LedgerLocked):
        Ledger.open(path)
    first.close()
    Ledger.open(path).close()


def test_unwritable_ledger_is_refused_up_front(tmp_path: Path) -> None:
    """A ledger in a directory that cannot be written is an error before anything is sent."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        import os
        if os.access(folder, os.W_OK):  # root ignores mode bits: use a missing folder instead
            folder = tmp_path / "missing" / "deeper"
        with pytest.raises(LedgerError, match="cannot open the ledger for writing"):
            Ledger.open(folder / "l.jsonl")
    finally:
        (tmp_path / "ro").chmod(0o700)


def group(name: str, fingerprint: str = "f1") -> Group:
    return Group(name=name, line=1, body=b"{}", fingerprint=fingerprint)


def latest(**records: dict[str, Any]) -> dict[str, Latest]:
    return {name: Latest.of(record) for name, record in records.items()}


@pytest.mark.parametrize(("known", "item", "expected"), [
    ({}, group("A"), (plan.Do.SEND, "new")),
    (latest(A=intent("A")), group("A"), (plan.Do.SEND, "in_doubt")),
    (latest(A=result("A", "created")), group("A"), (plan.Do.SKIP, "done")),
    (latest(A=result("A", "exists")), group("A", "f2"), (plan.Do.SKIP, "done_changed")),
    (latest(A=result("A", "rejected")), group("A"), (plan.Do.SKIP, "rejected_unchanged")),
    (latest(A=result("A", "rejected")), group("A", "f2"), (plan.Do.SEND, "fixed")),
    (latest(A=result("A", "invalid", "")), group("A"), (plan.Do.SEND, "fixed")),
    (latest(A=result("A", "deferred")), group("A"), (plan.Do.SEND, "deferred")),
    ({}, Invalid(line=3, name=None, problem=Problem("m", 3, "Name", "x")),
     (plan.Do.RECORD_INVALID, "invalid")),
])
def test_plan_decisions(known: dict[str, Latest], item: Group | Invalid,
                        expected: tuple[plan.Do, str]) -> None:
    """Skip what is done or unchanged-rejected; resend deferred, in-doubt, fixed and new."""
    decision = plan.decide(item, known)
    assert (decision.do, decision.why) == expected
