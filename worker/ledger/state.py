"""What a ledger says: the latest word per Name, the runs and their footers, the last run's
invalid lines; built by folding records in, one at a time."""

from __future__ import annotations

import sys
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from worker.ledger.records import (
    Footer,
    Intent,
    Item,
    Latest,
    Outcome,
    Record,
    Result,
    RunHeader,
    Target,
)
from worker.ledger.table import Table


@dataclass(slots=True)
class State:
    """What a ledger says: the latest word per Name, the runs, and the last run's invalid
    lines (by manifest line: a duplicate Name's invalid line is a fact of its own).

    `latest` is the on-disk index (table.Table) when read from a file; a plain dict when a
    State is built by folding records in memory (tests, small tools)."""

    latest: MutableMapping[str, Latest] | Table = field(default_factory=dict)
    runs: list[RunHeader] = field(default_factory=list)  # oldest first
    footers: dict[str, Footer] = field(default_factory=dict)  # run_id -> its footer
    invalid_lines: dict[int, str | None] = field(default_factory=dict)  # last run: line -> Name
    torn_tail: bool = False  # the last line was torn (cut by `Ledger.open`, skipped by readers)
    path: Path | None = None  # the file it was read from

    @property
    def target(self) -> Target | None:
        """The target of the first run: the one this ledger belongs to."""
        return self.runs[0].target if self.runs else None

    @property
    def header(self) -> RunHeader | None:
        return self.runs[-1] if self.runs else None

    @property
    def footer(self) -> Footer | None:
        """The last run's footer; None while it runs, or when it was killed or crashed."""
        return self.footers.get(self.runs[-1].run_id) if self.runs else None

    def fold(self, record: Record, offset: int = 0) -> None:
        """Take in one record (read at byte `offset` of the ledger)."""
        match record:
            case RunHeader():
                self.runs.append(record)
                self.invalid_lines = {}
            case Footer():
                self.footers[record.run_id] = record
            case Intent() | Result():
                self.fold_item(Item.of(record), offset)

    def fold_item(self, item: Item, offset: int) -> None:
        if item.outcome is Outcome.INVALID:
            self.invalid_lines[item.line] = item.name
        if item.name is None:
            return
        latest = self.latest
        if isinstance(latest, Table):
            latest.put(item, offset)  # the same rule as below, in the table
        elif item.outcome is not Outcome.INVALID or item.name not in latest:
            # An invalid line never hides what was sent for its Name: with a duplicate,
            # the valid line's intent or result is the Name's state. It only tells the
            # planner that a Name the ledger knows nothing else about was invalid.
            fp = bytes.fromhex(item.fingerprint) if item.fingerprint is not None else None
            latest[item.name] = Latest(
                outcome=item.outcome,
                action=item.action,
                fp=fp,
                code=sys.intern(item.code),
                line=item.line,
            )

    def trailer(self) -> dict[str, Any]:
        """What the index keeps beside the table: runs, footers, the last run's invalid
        lines, the codes (see index.finish)."""
        assert isinstance(self.latest, Table)
        return {
            "codes": self.latest.codes,
            "runs": [orjson.loads(orjson.dumps(r)) for r in self.runs],
            "footers": [orjson.loads(orjson.dumps(f)) for f in self.footers.values()],
            "invalid": [[line, name] for line, name in self.invalid_lines.items()],
        }

    def close(self) -> None:
        """Release the index (a State read from a file holds it open)."""
        if isinstance(self.latest, Table):
            self.latest.close()
