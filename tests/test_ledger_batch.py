"""Ledger: folding a ledger into its index a chunk at a time (Batch), or building the index
of a whole ledger in bulk (Bulk), gives the very table that folding it one record at a time
gives."""

from __future__ import annotations

import errno
import os
import random
import tempfile
from collections.abc import Callable

import pytest

from worker.ledger import batch, build, layout
from worker.ledger import table as table_module
from worker.ledger.batch import Batch
from worker.ledger.build import Bulk
from worker.ledger.records import Action, Item, Outcome
from worker.ledger.state import State
from worker.ledger.table import Table

NAMES: list[str | None] = [f"N{i}" for i in range(40)] + [None]
OUTCOMES = [None, None, *Outcome]  # None: an intent


def table(in_file: bool) -> Table:
    fd = None
    if in_file:
        fd, name = tempfile.mkstemp()
        os.unlink(name)
    return Table(fd, slots=1 << 12, used=0, codes=[], ledger_fd=None, writable=True, tmp_dir="/tmp")


def items(seed: int, n: int, names: list[str | None] = NAMES) -> list[Item]:
    rng = random.Random(seed)
    made = []
    for i in range(n):
        outcome = rng.choice(OUTCOMES)
        fp = f"{rng.randrange(4):064x}" if rng.random() < 0.8 else None
        action = None if outcome is Outcome.INVALID else rng.choice(list(Action))
        code = rng.choice(["", "", "Throttled", "InvalidParameter"]) if outcome else ""
        made.append(Item(rng.choice(names), i + 1, fp, action, outcome, code))
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


def same_tables(one: State, many: State, names: list[str | None]) -> None:
    a, b = one.latest, many.latest
    assert isinstance(a, Table) and isinstance(b, Table)
    assert len(a) == len(b) > 0 and a.slots == b.slots
    for name in names:
        if name is not None:
            assert a.get(name) == b.get(name), name
    assert one.invalid_lines == many.invalid_lines
    one.close()
    many.close()


def crowd_at(top: bytes) -> Callable[[str], bytes]:
    """Keys whose first bytes are `top`: every Name's home is the same few slots, so the
    probes run over region ends (and, at the table's end, wrap to its start)."""
    real = layout.name_key
    return lambda name: top + real(name)[len(top) :]


@pytest.mark.parametrize("in_file", [True, False])
@pytest.mark.parametrize(
    ("seed", "crowd"),
    [(0, None), (1, None), (2, b"\x00" * 7), (3, b"\x7f" + b"\xff" * 6), (4, b"\xff" * 7)],
    ids=["spread", "spread", "crowded at the start", "crowded mid-table", "crowded at the end"],
)
def test_a_bulk_build_is_a_fold_one_record_at_a_time(
    seed: int, crowd: bytes | None, in_file: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same latest word per Name (invalid lines never hiding what was sent), same used
    count, same invalid lines: over many regions, spilled to the scratch file and read back,
    with probes that run past a region's end and past the table's end."""
    if crowd is not None:
        monkeypatch.setattr(table_module, "name_key", crowd_at(crowd))
        monkeypatch.setattr(build, "name_key", crowd_at(crowd))
    monkeypatch.setattr(build, "REGION_BYTES", 8 * layout.SLOT_BYTES)  # 512 regions
    monkeypatch.setattr(build, "SPILL_AT", 40 * layout.SLOT_BYTES)
    monkeypatch.setattr(batch, "CHUNK", 5)  # take() says when Bulk encodes
    names: list[str | None] = [f"名{i}" for i in range(900)] + [None]
    one, many = State(latest=table(in_file)), State(latest=table(in_file))
    todo = items(seed, 3000, names)
    for offset, item in enumerate(todo):
        one.fold_item(item, offset * 100)
    building = Bulk(many)
    assert len(building.buckets) == 512
    for offset, item in enumerate(todo):
        building.add(item, offset * 100)
    building.flush()
    assert any(building.spilled)  # the scratch file was written and read back
    same_tables(one, many, names)


def test_a_bulk_build_grows_the_table_for_more_names_than_it_was_made_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """More Names than the table was sized for: it is made bigger before the layout."""
    monkeypatch.setattr(build, "REGION_BYTES", 64 * layout.SLOT_BYTES)
    names: list[str | None] = [f"名{i}" for i in range(4000)]
    todo = [Item(name, i + 1, None, Action.CREATE, None, "") for i, name in enumerate(names)]
    one, many = State(latest=table(True)), State(latest=table(True))
    for offset, item in enumerate(todo):
        one.fold_item(item, offset)
    building = Bulk(many)
    for offset, item in enumerate(todo):
        building.add(item, offset)
    building.flush()
    assert isinstance(many.latest, Table) and many.latest.slots == 1 << 13
    same_tables(one, many, names)


@pytest.mark.parametrize("fails", ["creating it", "the second write"])
def test_a_bulk_build_without_a_scratch_file_folds_slot_by_slot(
    fails: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No scratch file (it cannot be made, or the disk fills up while it is written): what
    was sorted so far and the rest go into the table one slot at a time, the same table."""
    monkeypatch.setattr(build, "REGION_BYTES", 8 * layout.SLOT_BYTES)
    monkeypatch.setattr(build, "SPILL_AT", 40 * layout.SLOT_BYTES)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if fails == "creating it":

        def cannot(table: Table) -> int:
            raise full

        monkeypatch.setattr(build, "_scratch_file", cannot)
    else:
        writes = []
        real = build._write_all

        def once(fd: int, data: bytearray, offset: int) -> None:
            writes.append(offset)
            if len(writes) > 1:
                raise full
            real(fd, data, offset)

        monkeypatch.setattr(build, "_write_all", once)
    names: list[str | None] = [f"名{i}" for i in range(300)] + [None]
    todo = items(7, 1500, names)
    one, many = State(latest=table(True)), State(latest=table(True))
    for offset, item in enumerate(todo):
        one.fold_item(item, offset * 100)
    building = Bulk(many)
    for offset, item in enumerate(todo):
        building.add(item, offset * 100)
    building.flush()
    assert building.direct
    same_tables(one, many, names)
