"""The duplicate check: a Name given on two lines makes the later line invalid.

Memory stays flat: lines are streamed, verdicts are on disk. Only this check grows with the
manifest, by 6 to 11 bytes per Name (`Seen`): 32 bits of a hash per Name in open-addressing
`array('I')` tables, not a dict (which cost ~194 B per line). A hash seen before only makes
a line a suspect; the suspects are settled after the pass by one read of the spool that
compares the Names themselves (`confirm`), so a hash collision never reports a duplicate,
and the message still names the first line. `respool` then turns each duplicate's record
into its problem.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from pathlib import Path
from typing import IO

from worker.errors import Problem
from worker.manifest.spool import FP_END, SpoolWriter, invalid_record, records
from worker.manifest.values import close_quietly


class Seen:
    """A set of 32-bit hashes in open-addressing `array('I')` tables (0 marks an empty slot).

    When the newest table is full, a new one twice its size is added and the old ones stay
    as they are: no rehash, so memory never holds an old and a new copy at once (a rehash
    would peak at three times the table). A lookup probes each table (at most ~5 for ten
    million Names), still far below what parsing the line costs. 6 to 11 B per Name.

    32 bits, not 64: ten million Names then make about n²/2³³ ≈ 12 000 chance suspects, which
    the confirming pass settles in a few MB, and the tables take half the memory (67 MB,
    not 134 MB, at ten million). A true duplicate has the same full hash, so the suspects
    keep full hashes and `confirm` looks at exactly the lines that share one."""

    FIRST_SLOTS = 1 << 16
    MAX_LOAD = 0.7

    def __init__(self) -> None:
        self.tables: list[tuple[array[int], int]] = []  # (table, its size - 1)
        self.used = self.limit = 0

    def add(self, h: int) -> bool:
        """Add `h`; True if it was there already. (Every line comes here: kept lean.)"""
        h = (h & 0xFFFF_FFFF) or 1
        for table, mask in self.tables:
            i = h & mask
            while (there := table[i]) != 0:
                if there == h:
                    return True
                i = (i + 1) & mask
        if self.used >= self.limit:
            size = (self.tables[-1][1] + 1) * 2 if self.tables else self.FIRST_SLOTS
            self.tables.append((array("I", bytes(4 * size)), size - 1))
            self.used, self.limit = 0, int(size * self.MAX_LOAD)
        table, mask = self.tables[-1]
        i = h & mask
        while table[i] != 0:
            i = (i + 1) & mask
        table[i] = h
        self.used += 1
        return False


def confirm(
    spool: IO[bytes], suspects: set[int], name_hash: Callable[[str], int]
) -> dict[int, tuple[str, int]]:
    """Settle the suspects by their Names: {line: (Name, first line)} for each real
    duplicate. One pass over the spool; it holds only the Names whose hash was seen twice."""
    first: dict[str, int] = {}
    duplicates: dict[int, tuple[str, int]] = {}
    for lineno, record in records(spool):
        if not record.startswith(b"G"):
            continue
        name = record[FP_END:].partition(b"\t")[0].decode()
        if name_hash(name) not in suspects:
            continue
        earlier = first.setdefault(name, lineno)
        if earlier != lineno:
            duplicates[lineno] = (name, earlier)
    return duplicates


def duplicate_reason(name: str, first: int) -> str:
    return f"{name!r} is already given on line {first}"


def problems(path: Path, duplicates: dict[int, tuple[str, int]]) -> list[Problem]:
    """Each duplicate's problem, in line order (as `confirm` found them)."""
    return [
        Problem(str(path), line, "Name", duplicate_reason(name, first))
        for line, (name, first) in duplicates.items()
    ]


def respool(
    spooled: SpoolWriter,
    duplicates: dict[int, tuple[str, int]],
    open_spool: Callable[[], IO[bytes]],
) -> None:
    """Replace the spool by a copy with each duplicate's record turned into its problem."""
    try:
        out = open_spool()
    except OSError as exc:
        raise spooled.error("create another", exc) from None
    copy = SpoolWriter(spooled.path, spooled.folder, out)
    try:
        try:
            for lineno, record in records(spooled.spool):
                if lineno in duplicates:
                    name, first = duplicates[lineno]
                    copy.write(invalid_record(name, "Name", duplicate_reason(name, first), [name]))
                else:
                    copy.write(record + b"\n")
        except OSError as exc:  # the reads: `copy.write` raises ManifestError itself
            raise spooled.error("read back", exc) from None
        copy.flush()
    except BaseException:
        close_quietly(out)
        raise
    close_quietly(spooled.spool)
    spooled.spool = out
