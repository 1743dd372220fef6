"""Manifest step, the source: read a JSONL manifest once into the spool of validated verdicts.

`scan` reads the source exactly once, in bounded lines: it validates every line (before
anything is sent), hashes the bytes for the ledger header, and writes each line's verdict to
a private spool file (spool.py): the canonical body of a valid line, the problem of an
invalid one. `spool.read` streams that spool, never the source, so every body sent is one
that was validated, made from the bytes that were hashed: a pipe (`run <(gen)`,
`cat m | run /dev/stdin`) works, and a source appended to or edited in place after `scan`
has no effect. `read` may be called any number of times (to plan, then to send); each call
is an independent pass that parses no JSON.

Memory stays flat: lines are streamed, verdicts are on disk; only the duplicate check grows
with the manifest (duplicates.py).
"""

from __future__ import annotations

import hashlib
import heapq
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from worker.errors import Problem
from worker.manifest import duplicates
from worker.manifest.line_names import names_of
from worker.manifest.spool import SpoolWriter, group_record, invalid_record, temporary_file
from worker.manifest.validate import judge, name_of
from worker.manifest.values import (
    MAX_LINE_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_SHOWN,
    MAX_SKIPPED_LINE_BYTES,
    Scan,
    close_quietly,
    file_error,
    strerror,
)

_BOM = b"\xef\xbb\xbf"
_READ_BUFFER = 1 << 16
_SPOOL_BATCH = 4096  # records


def scan(
    path: Path,
    *,
    spool_dir: Path | None = None,
    max_bytes: int = MAX_MANIFEST_BYTES,
    name_hash: Callable[[str], int] = hash,
    open_spool: Callable[[Path | None], IO[bytes]] | None = None,
) -> Scan:
    """Read `path` once: validate every line and keep a private copy for `read`.

    `path` may be a regular file, a FIFO, /dev/stdin or a process substitution. The spool is
    created in `spool_dir` (default: tempfile's directory; pass the ledger's folder to keep
    it off a small /tmp). Raises ManifestError for a source that cannot be read at all, is
    larger than `max_bytes`, or holds no groups; line problems are returned, not raised.
    `name_hash` is the duplicate check's hash (tests pass a tiny one to force collisions);
    `open_spool(spool_dir)` makes a spool file (default: an unlinked temporary file; tests
    pass one that fails). Every failure of the spool (create, write, flush, read back) is a
    ManifestError naming the manifest, the spool's folder and the reason.
    """
    folder = str(spool_dir) if spool_dir is not None else tempfile.gettempdir()
    opener = open_spool or temporary_file
    try:
        spool = opener(spool_dir)
    except OSError as exc:
        raise file_error(path, f"cannot create a spool file in {folder}: {strerror(exc)}") from None
    spooled = SpoolWriter(path, folder, spool)
    try:
        return _scan(path, spooled, max_bytes, name_hash, lambda: opener(spool_dir))
    except BaseException:
        # Quietly: a buffer that could not be flushed fails again on close, and the error
        # that says why is the one being raised.
        close_quietly(spooled.spool)
        raise


def _scan(
    path: Path,
    spooled: SpoolWriter,
    max_bytes: int,
    name_hash: Callable[[str], int],
    open_spool: Callable[[], IO[bytes]],
) -> Scan:
    digest = hashlib.sha256()
    source = _Source(path, digest, max_bytes)
    verdicts = _Verdicts()
    suspects = _spool_verdicts(source, spooled, verdicts, name_hash)
    spooled.flush()  # `read` reads the descriptor, not this buffer
    if suspects:
        _settle_duplicates(spooled, suspects, name_hash, open_spool, verdicts)
    if verdicts.groups == 0 and not verdicts.invalid:
        raise file_error(path, "the manifest holds no groups (it is empty or has only blank lines)")
    return Scan(
        path=path,
        sha256=digest.hexdigest(),
        size=source.size,
        groups=verdicts.groups,
        invalid=verdicts.invalid,
        problems=verdicts.shown,
        problem_count=verdicts.count,
        spool=spooled.spool,
        spool_dir=spooled.folder,
    )


@dataclass(slots=True)
class _Verdicts:
    """The counts `scan` keeps while it writes the spool."""

    groups: int = 0  # valid lines
    invalid: int = 0  # invalid lines
    count: int = 0  # every problem
    shown: list[Problem] = field(default_factory=list)  # the first MAX_SHOWN problems

    def add_invalid(self, found: list[Problem]) -> None:
        self.invalid += 1
        self.count += len(found)
        self.shown.extend(found[: max(0, MAX_SHOWN - len(self.shown))])


def _spool_verdicts(
    source: _Source, spooled: SpoolWriter, verdicts: _Verdicts, name_hash: Callable[[str], int]
) -> set[int]:
    """The one pass over the source: each line's verdict to the spool. Returns the Name
    hashes seen more than once (their lines are settled after the pass)."""
    hashes = duplicates.Hashes()  # freed on return: its memory is the scan's peak
    add = hashes.add
    records: list[bytes] = []  # written a few thousand at a time: a write per line cost 0.4 us
    put = records.append
    for lineno, raw in source.lines():
        result = judge(source.path, lineno, raw)
        if isinstance(result, tuple):
            name, body, fingerprint = result
            add(name_hash(name))
            verdicts.groups += 1
            put(group_record(name, body, fingerprint))
        elif result is None:
            put(b"\n")  # one spool line per source line keeps numbers true
        else:
            first = result[0]
            put(invalid_record(name_of(raw), first.field, first.reason, names_of(raw)))
            verdicts.add_invalid(result)
        if len(records) >= _SPOOL_BATCH:
            spooled.write(b"".join(records))
            records.clear()
    spooled.write(b"".join(records))
    return hashes.repeated()


def _settle_duplicates(
    spooled: SpoolWriter,
    suspects: set[int],
    name_hash: Callable[[str], int],
    open_spool: Callable[[], IO[bytes]],
    verdicts: _Verdicts,
) -> None:
    """Compare the suspects' Names; each real duplicate becomes an invalid line."""
    try:
        found = duplicates.confirm(spooled.spool, suspects, name_hash)
    except OSError as exc:
        raise spooled.error("read back", exc) from None
    if not found:
        return
    duplicates.respool(spooled, found, open_spool)
    verdicts.groups -= len(found)
    verdicts.invalid += len(found)
    verdicts.count += len(found)
    dup_problems = duplicates.problems(spooled.path, found)[:MAX_SHOWN]
    merged = heapq.merge(verdicts.shown, dup_problems, key=lambda p: p.line)
    verdicts.shown = list(merged)[:MAX_SHOWN]


class _Source:
    """The source, read once in bounded lines, hashed as it is read, size-capped."""

    def __init__(self, path: Path, digest: Any, max_bytes: int) -> None:
        self.path = path
        self.digest = digest
        self.max_bytes = max_bytes
        self.size = 0

    def lines(self) -> Iterator[tuple[int, bytes]]:
        """(line number, content without BOM and line end); b"" marks an over-long line,
        which the parser cannot confuse with a blank one (that is b" ")."""
        with self._open() as f:
            lineno = 0
            while raw := self._readline(f, MAX_LINE_BYTES + 1):
                lineno += 1
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    self._skip_rest(f, lineno, len(raw))
                    yield lineno, b""
                    continue
                if lineno == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM) :]
                yield lineno, raw.rstrip(b"\r\n") or b" "

    def _skip_rest(self, f: IO[bytes], lineno: int, length: int) -> None:
        """Read past the end of an over-long line, in bounded pieces."""
        while (rest := self._readline(f, MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
            length += len(rest)
            if length > MAX_SKIPPED_LINE_BYTES:
                raise file_error(
                    self.path,
                    f"line {lineno} is longer than "
                    f"{MAX_SKIPPED_LINE_BYTES} bytes: this is not a JSONL "
                    "manifest",
                )

    def _open(self) -> IO[bytes]:
        path = self.path
        try:
            # A FIFO blocks here until its writer opens it, as `cat` would: opening it
            # non-blocking would read an empty pipe as an empty manifest.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except IsADirectoryError:
            raise file_error(path, "is a directory, not a file") from None
        except FileNotFoundError:
            raise file_error(path, "no such file") from None
        except OSError as exc:
            kind = _kind(path)
            reason = f"is {kind}, not a file" if kind else f"cannot open it: {exc.strerror}"
            raise file_error(path, reason) from None
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise file_error(path, "is a directory, not a file")
            if stat.S_ISSOCK(mode):
                raise file_error(path, "is a socket, not a file")
        except BaseException:
            os.close(fd)
            raise
        return open(fd, "rb", buffering=_READ_BUFFER)  # the caller closes it

    def _readline(self, f: IO[bytes], limit: int) -> bytes:
        try:
            raw = f.readline(limit)
        except OSError as exc:
            raise file_error(self.path, f"cannot read it: {exc.strerror}") from None
        self.size += len(raw)
        if self.size > self.max_bytes:
            raise file_error(
                self.path,
                f"is larger than {self.max_bytes} bytes: split it "
                "(or it is a device that never ends)",
            )
        self.digest.update(raw)
        return raw


def _kind(path: Path) -> str | None:
    """'a socket' etc. for a path open() refused because of what it is, else None."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    return None
