"""Ledger: folding a ledger into its index a chunk at a time gives the very table that
folding it one record at a time gives."""

from __future__ import annotations

import os
import random
import tempfile

import pytest

from worker.ledger import batch
from worker.ledger.batch import Batch
from worker.ledger.records import Action, Item, Outcome
from worker.ledger.state import State
from worker.ledger.table import Table

NAMES = [f"N{i}" for i in range(40)] + [None]
OUTCOMES = [None, None, *Outcome]  # None: an intent


def table(in_file: bool) -> Table:
    fd = None
    if in_file:
        fd, name = tempfile.mkstemp()
        os.unlink(name)
    return Table(fd, slots=1 << 12, used=0, codes=[], ledger_fd=None, writable=True, tmp_dir="/tmp")


def items(seed: int, n: int) -> list[Item]:
    rng = random.Random(seed)
    made = []
    for i in range(n):
        outcome = rng.choice(OUTCOMES)
        fp = f"{rng.randrange(4):064x}" if rng.random() < 0.8 else None
        action = None if outcome is Outcome.INVALID else rng.choice(list(Action))
        code = rng.choice(["", "", "Throttled", "InvalidParameter"]) if outcome else ""
        made.append(Item(rng.choice(NAMES), i + 1, fp, action, outcome, code))
    return made


@pytest.mark.parametrize("in_file", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_a_batched_fold_is_a_fold_one_record_at_a_time(
    seed: int, in_file: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same latest word per Name (invalid lines never hiding what was sent), same used
    count, same invalid lines, across chunk boundaries, in a file and in memory."""
    monkeypatch.setattr(batch, "CHUNK", 7)
    one, many = State(latest=table(in_file)), State(latest=table(in_file))
    todo = items(seed, 600)
    for offset, item in enumerate(todo):
        one.fold_item(item, offset * 100)
    folding = Batch(many)
    for offset, item in enumerate(todo):
        folding.add(item, offset * 100)
    folding.flush()
    a, b = one.latest, many.latest
    assert isinstance(a, Table) and isinstance(b, Table)
    assert len(a) == len(b) > 0
    for name in NAMES:
        if name is not None:
            assert a.get(name) == b.get(name), name
    assert one.invalid_lines == many.invalid_lines
    one.close()
    many.close()
