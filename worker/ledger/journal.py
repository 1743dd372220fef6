"""Ledger step: the append-only JSONL journal of every run against one target, and what it
says about each Name.

One typed record per line (records.py): a `run` header opens each run, `intent` before each
request, `result` once per finished item, `end` when a run ends (not after `kill -9`).

Writes are synchronous `os.write` calls of whole records on an O_APPEND descriptor: nothing
can be scheduled between deciding an outcome and recording it, and a crash can tear only the
last line. Opening repairs exactly that and nothing else:

* A ledger belongs to one target (endpoint, region, access key): a file whose headers name
  another target, or none (worker 0.1), is refused before anything is written.
* A file is a ledger only if its first line is our run header. Anything else (a config
  file, the manifest, a FIFO, a device, a directory) is refused untouched; a 0-byte file is
  adopted. A torn last line is cut only after every line before it has parsed, and a lone
  first line only if it starts with the exact bytes our header starts with.
* Every line read is bounded (MAX_RECORD_BYTES); a longer one is damage, not data.
* A run locks the ledger file itself and `<ledger>.lock` beside it (lock.py): no
  path to the file (a hard link, a rename) lets a second run in; `kill -9` leaves no stale
  lock; `report` probes both to tell a running run from a crashed one.
* The index is derived: one that does not match its ledger is rebuilt, never a reason to
  refuse the ledger (`load.load_state`).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import orjson

from worker.errors import LedgerError, LedgerTargetMismatch, LedgerWriteError
from worker.ledger import index
from worker.ledger.file import MAX_RECORD_BYTES, Reader, check_same_file, open_regular
from worker.ledger.load import Prebuilt, load_state
from worker.ledger.lock import Holder, lock_beside, lock_file, release
from worker.ledger.records import Record, RunHeader, Target
from worker.ledger.state import State
from worker.ledger.storage import unavailable
from worker.ledger.table import Table

FSYNC_EVERY_S: Final = 1.0
# How often a run records in its index how far the ledger is folded in (index.checkpoint):
# after a `kill -9`, the next run reads the ledger from the last checkpoint on, not whole.
CHECKPOINT_S: Final = 10.0


def default_path(manifest: Path) -> Path:
    """groups.jsonl -> groups.ledger.jsonl, beside the manifest."""
    stem = manifest.name[: -len(".jsonl")] if manifest.name.endswith(".jsonl") else manifest.name
    return manifest.with_name(f"{stem}.ledger.jsonl")


class Ledger:
    """An open, locked ledger that a run appends to. Use as `with Ledger.open(...) as book:`."""

    def __init__(
        self,
        path: Path,
        fd: int,
        lock_fd: int,
        state: State,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.state = state
        self._fd = fd
        self._lock_fd = lock_fd
        self._dirty = False
        self._clock = clock  # when to checkpoint the index
        self._broken: str | None = None
        self._end = 0  # the ledger's size: where the next record starts
        self._lines = 0
        self._next_checkpoint = clock() + CHECKPOINT_S

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        target: Target,
        expect_names: int = 0,
        clock: Callable[[], float] = time.monotonic,
        holder: Holder | None = None,
        prebuilt: Prebuilt | None = None,
    ) -> Self:
        """Open (or create) the ledger of `target` at `path`, lock it, load it, cut a torn
        tail. Raises LedgerError (not a ledger, damaged, unreadable), LedgerTargetMismatch
        (another target's, or worker 0.1's) or LedgerLocked; in every case nothing in the
        file has changed. The index beside it (`<ledger>.index`) is brought up to date;
        `expect_names` (the manifest's groups) sizes a new one so it need not grow; `holder`
        is named in the lock file, for a second run's message (lock.py); `prebuilt` is the
        index being rebuilt by another process, if one was started (prebuild.py)."""
        fd = open_regular(path, write=True)
        assert fd is not None
        lock_fd = -1
        try:
            # The first header decides whose ledger this is: checked before the lock file is
            # created, so a mistyped --ledger leaves nothing behind beside a foreign file.
            with open(os.dup(fd), "rb") as f:
                first = next(iter(Reader(path, f)), None)
            if isinstance(first, RunHeader):
                _check_target(path, first, target)
            lock_fd = lock_beside(path, holder)
            lock_file(path, fd)
            check_same_file(path, fd)
            state, torn_at, end, lines = load_state(
                path,
                fd,
                lock_held=True,
                expect_names=expect_names,
                check=lambda header: _check_target(path, header, target),
                prebuilt=prebuilt,
            )
            if torn_at is not None:
                # The only write `open` makes, after every other line proved this a ledger of
                # this target: a crash mid-write left this tail; the next append would glue
                # a record to it.
                os.ftruncate(fd, torn_at)
                os.fsync(fd)
                state.torn_tail = True
        except OSError as exc:
            release(fd, lock_fd)
            raise LedgerError(
                f"{path}: cannot read or repair the ledger: {exc.strerror}; nothing was changed"
            ) from None
        except BaseException:
            release(fd, lock_fd)
            raise
        book = cls(path, fd, lock_fd, state, clock=clock)
        book._end, book._lines = end, lines
        return book

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        status = "closed" if self._fd < 0 else "broken" if self._broken else "open"
        return f"<Ledger {str(self.path)!r} {status} names={len(self.state.latest)}>"

    def append(self, record: Record) -> None:
        """Write one whole record now, then fold it into `state`. Raises LedgerWriteError when
        it cannot; after that the ledger refuses every write, so nothing more is sent whose
        outcome it could not keep."""
        if self._broken is not None:
            raise LedgerWriteError(self._broken)
        if self._fd < 0:
            raise LedgerWriteError(f"{self.path}: the ledger is closed")
        data = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        if len(data) > MAX_RECORD_BYTES:
            # Nothing is written: a line this long would read back as damage.
            raise LedgerWriteError(
                f"{self.path}: a {record.type} record of {len(data)} bytes "
                f"is over the {MAX_RECORD_BYTES}-byte limit; not written"
            )
        try:
            self._write(memoryview(data))
            # Where the record really ended (O_APPEND writes at the file's end): the index
            # must never say a record starts where none does.
            end = os.lseek(self._fd, 0, os.SEEK_CUR)
        except OSError as exc:
            self._broken = f"{self.path}: cannot write the ledger: {exc.strerror}"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._broken += (
                    f" (to make room, {self.path.name}.spool and {self.path.name}.index "
                    "beside it may be deleted: both are derived and rebuilt when missing)"
                )
            raise LedgerWriteError(self._broken) from None
        self._dirty = True
        offset, self._end, self._lines = end - len(data), end, self._lines + 1
        try:
            self.state.fold(record, offset)
        except OSError as exc:  # the index could not grow (a full disk): stop sending
            self._broken = f"{self.path}: cannot update the ledger's index: {exc.strerror}"
            raise LedgerWriteError(self._broken) from None
        if self._clock() >= self._next_checkpoint:
            self._checkpoint()

    def _write(self, view: memoryview) -> None:
        """All of `view` at the file's end (O_APPEND), however many writes that takes."""
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def _checkpoint(self) -> None:
        """Record in the index how far the ledger is folded in (index.checkpoint). Here,
        on the thread that appends, never beside it: the table must not grow or close
        under it, and the ledger is fsynced first, so the index never claims records a
        power cut could take back (an fsync every CHECKPOINT_S on this thread costs
        milliseconds). The index is a cache: a checkpoint that fails is given up."""
        self._next_checkpoint = self._clock() + CHECKPOINT_S
        table = self.state.latest
        if not isinstance(table, Table) or table.path is None or table.in_memory:
            return
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self._broken = f"{self.path}: cannot sync the ledger: {exc.strerror}"
            raise LedgerWriteError(self._broken) from None
        try:
            at = index.covered(self._fd, self._end, self._lines)
            index.checkpoint(table, at, self.state.trailer())
        except OSError as exc:  # left marked dirty: the next run rebuilds it
            unavailable(table.path, exc, "a rebuild by the next run")
            self._next_checkpoint = float("inf")

    def sync(self) -> None:
        """fsync if anything was written since the last one. The runner calls this from a
        worker thread every FSYNC_EVERY_S: an fsync can take tens of milliseconds, and on the
        event loop that stall would bunch up paced requests."""
        if not self._dirty or self._fd < 0:
            return
        self._dirty = False  # before the fsync: a write racing with it marks it dirty again
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self._broken = f"{self.path}: cannot sync the ledger: {exc.strerror}"
            raise LedgerWriteError(self._broken) from None

    def close(self) -> None:
        """fsync, bring the index up to date, close, drop the lock. Idempotent. The lock goes
        last, after the fsyncs, so the next run never reads a ledger (or an index) this one
        has not finished writing. After a failed write the index stays marked dirty: the
        next open rebuilds it from the ledger."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            if self._broken is None:
                os.fsync(fd)
                table = self.state.latest
                if isinstance(table, Table) and table.path is not None and not table.in_memory:
                    try:
                        at = index.covered(fd, self._end, self._lines)
                        index.finish(table, at, self.state.trailer())
                    except OSError as exc:  # it stays marked dirty: the next open rebuilds it
                        unavailable(table.path, exc, "a rebuild by the next run")
        except OSError as exc:
            self._broken = f"{self.path}: cannot sync the ledger: {exc.strerror}"
            raise LedgerWriteError(self._broken) from None
        finally:
            # `state` stays readable after close (its index is unmapped when it is let go,
            # or by state.close()).
            release(fd, self._lock_fd)


def _check_target(path: Path, header: RunHeader, target: Target) -> None:
    if header.target != target:
        theirs, ours = header.target, target
        differ = [
            f"{what} {a!r} (this run: {b!r})"
            for what, a, b in (
                ("endpoint", theirs.endpoint, ours.endpoint),
                ("--region", theirs.region, ours.region),
                ("access key", theirs.access_key, ours.access_key),
            )
            if a != b
        ]
        same = f" (--region {theirs.region})" if theirs.region != ours.region else ""
        raise LedgerTargetMismatch(
            f"{path}: this ledger belongs to {theirs}, not to {ours}: its "
            f"{', '.join(differ)}; nothing was sent. If the ledger's target is the one you "
            f"mean, run with it{same}; else use another --ledger for this target, or move "
            "this one aside"
        )
