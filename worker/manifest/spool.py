"""The spool: the private copy of the manifest's verdicts that `source.scan` writes and
`read` streams, one record per source line.

Records: b"" for a blank line; b"G" + the body's sha256 (hex) + Name + TAB + canonical body
for a group; b"!" + JSON [name, field, reason, names] for an invalid line. `read` parses no
JSON for a group, so every later pass (plan, send) is cheap.

The spool lives on a real disk (the ledger's folder), which may be full, read-only or
failing. While `scan` writes it, every failure (`SpoolWriter`) is a ManifestError naming the
manifest, the spool's folder and the reason: nothing was sent yet. A failure to read it back
later, while `read` feeds a run, is a SpoolError (a LedgerWriteError: the run stops, exit 7
once requests went out). Closing it never fails: it is an unlinked scratch copy, and nothing
in it is still needed then.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import orjson

from worker.errors import ManifestError, Problem, SpoolError
from worker.manifest.values import Group, Invalid, Scan, file_error, strerror

SPOOL_BUFFER = 1 << 16
FP_END = 1 + 64  # a group's spool record: b"G", its fingerprint (hex), Name, TAB, body


def group_record(name: str, body: bytes, fingerprint: str) -> bytes:
    """A valid line's record. A Name holds no TAB (api.name_problem) and canonical JSON no
    newline. The fingerprint is kept so that no later pass hashes the body again."""
    return b"G" + fingerprint.encode() + name.encode() + b"\t" + body + b"\n"


def invalid_record(name: str | None, field_name: str, reason: str, names: Sequence[str]) -> bytes:
    """An invalid line's record: the Name shown, its first problem, every Name it could mean."""
    return b"!" + orjson.dumps([name, field_name, reason, list(names)]) + b"\n"


def read(scanned: Scan) -> Iterator[Group | Invalid]:
    """Stream the spool: each non-blank line as a Group, or as Invalid with its first problem,
    exactly as `scan` judged it. Raises SpoolError when the spool cannot be read back (a
    failing disk): this runs while requests go out, so it is not a ManifestError, whose
    exit code says that nothing was sent."""
    for item in read_lazily(scanned):
        yield item.group() if isinstance(item, Spooled) else item


class Spooled(NamedTuple):
    """A valid line as the spool holds it: its Name and fingerprint at hand, its Group
    made only when asked for (a plan that skips the line never needs its body). A
    NamedTuple: made for every line of a run's plan, at a seventh of a frozen dataclass's
    cost (measured: 0.13 against 1.06 us)."""

    name: str
    line: int
    fingerprint: str
    record: bytes

    @property
    def body(self) -> bytes:
        return self.record.partition(b"\t")[2]

    def group(self) -> Group:
        return Group(name=self.name, line=self.line, body=self.body, fingerprint=self.fingerprint)


def read_lazily(scanned: Scan) -> Iterator[Spooled | Invalid]:
    """`read`, each valid line as a Spooled (its Group on demand)."""
    where, spooled = str(scanned.path), tuple.__new__
    try:
        for lineno, record in records(scanned.spool, scanned.start):
            if record.startswith(b"G"):
                name = record[FP_END : record.index(b"\t", FP_END)].decode()
                fingerprint = record[1:FP_END].decode()
                yield spooled(Spooled, (name, lineno, fingerprint, record))
            elif record.startswith(b"!"):
                name, field_name, reason, names = orjson.loads(record[1:])
                yield Invalid(
                    line=lineno,
                    name=name,
                    problem=Problem(where, lineno, field_name, reason),
                    names=tuple(names),
                )
    except OSError as exc:  # only the spool's reads raise it: the consumer's errors stay there
        raise SpoolError(
            f"{scanned.path}: cannot read back its private spool file in "
            f"{scanned.spool_dir}: {strerror(exc)}; the ledger is consistent: run the same "
            "command again"
        ) from None


class SpoolWriter:
    """The spool while `scan` writes it: its OSErrors become ManifestErrors that name the
    manifest, the spool's folder and the reason."""

    def __init__(self, path: Path, folder: str, spool: IO[bytes]) -> None:
        self.path = path
        self.folder = folder
        self.spool = spool

    def write(self, data: bytes) -> None:
        try:
            self.spool.write(data)
        except OSError as exc:
            raise self.error("write", exc) from None

    def flush(self) -> None:
        try:
            self.spool.flush()
        except OSError as exc:
            raise self.error("write", exc) from None

    def error(self, doing: str, exc: OSError) -> ManifestError:
        return file_error(
            self.path,
            f"cannot {doing} its private spool file in {self.folder}: {strerror(exc)}",
        )


class _Pread(io.RawIOBase):
    """Reads the spool at its own offset (os.pread), so passes never disturb each other."""

    def __init__(self, spool: IO[bytes], start: int = 0) -> None:
        self._fd = spool.fileno()
        self._offset = start

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = os.pread(self._fd, len(buffer), self._offset)
        buffer[: len(data)] = data
        self._offset += len(data)
        return len(data)


def records(spool: IO[bytes], start: int = 0) -> Iterator[tuple[int, bytes]]:
    # Unbounded readline is safe here: `scan` wrote every line, none longer than a manifest
    # line may be (a remembered spool's were checked by its sha256: see remembered.recall).
    with io.BufferedReader(_Pread(spool, start), SPOOL_BUFFER) as f:
        for lineno, raw in enumerate(f, start=1):
            yield lineno, raw[:-1]


def temporary_file(folder: Path | None) -> IO[bytes]:
    return tempfile.TemporaryFile(dir=folder)  # the Scan owns it and closes it
