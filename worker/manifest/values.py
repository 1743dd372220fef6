"""The manifest step's values and limits, shared by the source, the spool, the duplicate
check and the remembered validation (which must not import one another in a circle).

`Group` is a valid line with the exact bytes that will be signed and sent; `Invalid` a line
refused with its first problem; `Scan` what the one pass over the source learnt, with the
private spool it wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import orjson

from worker.errors import ManifestError, Problem

MAX_LINE_BYTES = 1 << 20  # a group body is tiny; a longer line is a mistake, not data
# An over-long line is skipped to its end so the lines after it keep their numbers; past this
# it is not a manifest at all (a binary file, a device such as /dev/zero) and we stop.
MAX_SKIPPED_LINE_BYTES = 64 << 20
# The whole source. Ten million groups are about 2 GB; a source past this is a mistake or a
# device that never ends (/dev/zero, /dev/urandom), and we stop reading it.
MAX_MANIFEST_BYTES = 16 << 30
MAX_SHOWN = 50  # problems printed; all are counted


@dataclass(frozen=True, slots=True, kw_only=True)
class Group:
    """One valid manifest line, with the exact bytes that will be signed and sent."""

    name: str
    line: int
    body: bytes = field(repr=False)  # canonical JSON: Name, ProjectName, Tags (if any)
    fingerprint: str  # sha256 of body: changes exactly when what we would send changes

    @property
    def payload(self) -> dict[str, Any]:
        loaded: dict[str, Any] = orjson.loads(self.body)
        return loaded


@dataclass(frozen=True, slots=True, kw_only=True)
class Invalid:
    line: int
    name: str | None  # the Name shown and recorded: printable, or None
    problem: Problem
    # Every Name the line could mean (line_names): what `sync --prune` must not delete.
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # The Name shown is one the line could mean, so it is always protected too.
        if self.name is not None and self.name not in self.names:
            object.__setattr__(self, "names", (*self.names, self.name))


def name_of(item: Group | Invalid) -> str | None:
    """The Name a manifest item is looked up by (read_ahead's key)."""
    return item.name


def names_of(item: Group | Invalid) -> tuple[str, ...]:
    """Every Name a manifest item gives: a group's Name; every Name an invalid line could
    mean (what `sync --prune` must never delete)."""
    return item.names if isinstance(item, Invalid) else (item.name,)


@dataclass(frozen=True, slots=True, kw_only=True)
class Scan:
    """What the one pass over the source learnt, and the private copy of what it read.

    A context manager: closing it removes the spool. The spool is an unlinked temporary file
    (mode 0600), so it vanishes with the process even after `kill -9`.
    """

    path: Path
    sha256: str  # of the source's bytes exactly as read (BOM, CR and over-long lines included)
    size: int  # bytes read from the source
    groups: int  # valid lines
    invalid: int  # invalid lines (`read` yields each as Invalid, with its first problem)
    problems: list[Problem]  # every problem, capped at MAX_SHOWN
    problem_count: int  # every problem, counted
    # One record per source line: b"" blank, b"G" name TAB body,
    # b"!" JSON [name, field, reason, names]
    spool: IO[bytes] = field(repr=False, compare=False)
    spool_dir: str = ""  # the spool's folder, for messages
    start: int = 0  # where the spool's records begin (after a remembered spool's header)
    recalled: bool = False  # validated by an earlier run, for these very bytes (`recall`)

    def close(self) -> None:
        close_quietly(self.spool)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def close_quietly(spool: IO[bytes]) -> None:
    """Close the spool and let go of its descriptor whatever happens (a buffered file
    whose flush fails still closes its descriptor, then raises)."""
    try:
        spool.close()
    except OSError:
        pass  # an unlinked scratch copy: nothing in it is needed any more


def strerror(exc: OSError) -> str:
    return exc.strerror or str(exc)


def file_error(path: Path, reason: str) -> ManifestError:
    return ManifestError([Problem(str(path), 0, "", reason)], 1)
