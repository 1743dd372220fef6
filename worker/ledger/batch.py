"""Folding a ledger read from disk into its index a chunk of records at a time.

Most Names appear in the ledger as an intent and, right after it, its result: folding
record by record wrote each Name's slot twice. A `Batch` keeps the latest record per Name
of the last CHUNK records in a dict and writes only that one to the table, which halves the
slot writes of a rebuild (the dearest step of it: a hash, a probe, a keyed check per write).

The result is the table that folding one record at a time makes: a Name's word is its
latest record's, and an invalid line never hides what was sent for its Name (it is dropped
here when the chunk already holds the Name, and `Table.put` drops it when the table does).
The last run's invalid lines are kept at once, in record order, because a run header
clears them.
"""

from __future__ import annotations

from typing import Final

from worker.ledger.records import Item, Outcome
from worker.ledger.state import State
from worker.ledger.table import Table

# Bounded memory: ~200 B per pending Name.
CHUNK: Final = 4096


def take(state: State, pending: dict[str, tuple[Item, int]], item: Item, offset: int) -> bool:
    """One intent or result, read at byte `offset`, into `pending` (the latest record per
    Name wins; an invalid line goes to `state` at once and never hides a Name pending).
    True when `pending` holds CHUNK Names: time to write them (Batch.flush, Bulk's encode)."""
    name = item.name
    if item.outcome is Outcome.INVALID:
        state.invalid_lines[item.line] = name
        if name is None or name in pending:
            return False
    elif name is None:
        return False
    pending[name] = (item, offset)
    return len(pending) >= CHUNK


class Batch:
    """Intents and results on their way into `state`'s table; `flush` before using it."""

    def __init__(self, state: State) -> None:
        assert isinstance(state.latest, Table)
        self.state = state
        self.table = state.latest
        self.pending: dict[str, tuple[Item, int]] = {}

    def add(self, item: Item, offset: int) -> None:
        """Take in one intent or result, read at byte `offset` of the ledger."""
        if take(self.state, self.pending, item, offset):
            self.flush()

    def flush(self) -> None:
        put = self.table.put
        for item, offset in self.pending.values():
            put(item, offset, bulk=True)
        self.pending.clear()

    def close(self) -> None:
        """Nothing to let go (as Bulk.close)."""
