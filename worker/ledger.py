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
* A run locks the ledger file itself and `<ledger>.lock` beside it (ledger_lock.py): no
  path to the file (a hard link, a rename) lets a second run in; `kill -9` leaves no stale
  lock; `report` probes both to tell a running run from a crashed one.
* The index is derived: one that does not match its ledger is rebuilt, never a reason to
  refuse the ledger (`_load`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self

import orjson

from worker import index
from worker.errors import LedgerError, LedgerTargetMismatch, LedgerWriteError
from worker.index import Latest, Table
from worker.ledger_lock import lock_beside, lock_file, lock_path, probe_lock, release
from worker.records import (
    Footer,
    Intent,
    Item,
    Outcome,
    Record,
    Result,
    RunHeader,
    Target,
    item_of,
    parse,
)

__all__ = ["Latest", "Ledger", "State", "lock_path", "probe_lock", "read_state", "records_of"]

FSYNC_EVERY_S: Final = 1.0
# How often a run records in its index how far the ledger is folded in (index.checkpoint):
# after a `kill -9`, the next run reads the ledger from the last checkpoint on, not whole.
CHECKPOINT_S: Final = 10.0
# The largest record we write is a result holding a 1 MiB manifest body and a bounded
# message; four times that leaves room and still bounds what one line can make us hold.
MAX_RECORD_BYTES: Final = 4 << 20
# orjson writes dataclass fields in order, so every header we write starts with these bytes.
# Only a lone unterminated first line that starts so is a torn header of ours.
_HEADER_PREFIX: Final = b'{"type":"run","run_id":"'


def default_path(manifest: Path) -> Path:
    """groups.jsonl -> groups.ledger.jsonl, beside the manifest."""
    stem = manifest.name[: -len(".jsonl")] if manifest.name.endswith(".jsonl") else manifest.name
    return manifest.with_name(f"{stem}.ledger.jsonl")


@dataclass(slots=True)
class State:
    """What a ledger says: the latest word per Name, the runs, and the last run's invalid
    lines (by manifest line: a duplicate Name's invalid line is a fact of its own).

    `latest` is the on-disk index (index.Table) when read from a file; a plain dict when a
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


def read_state(path: Path) -> State:
    """Load without locking, repairing or checking the target (dry runs and reports). A
    missing file is an empty ledger; a torn tail is skipped; anything else is refused.
    Uses the ledger's index if it is clean and covers the whole ledger, else builds a
    private one, in a file or else in memory (only a run, holding the lock, writes the
    shared index). Close the State (or let it go) to release the index."""
    fd = _open_regular(path, write=False)
    if fd is None:
        return State(path=path)
    try:
        with open(os.dup(fd), "rb") as f:
            next(iter(_Reader(path, f)), None)  # refuses a file that is not a ledger
        state, torn_at, _, _ = _load(path, fd, lock_held=False, expect_names=0, check=None)
    except OSError as exc:  # not the index's: it falls back on its own (out of memory, fds)
        raise LedgerError(f"{path}: cannot read the ledger: {exc.strerror}") from None
    finally:
        os.close(fd)
    state.torn_tail = torn_at is not None
    return state


def records_of(path: Path) -> Iterator[Record]:
    """Every record of the ledger at `path`, streamed, as `read_state` reads them (a second
    pass for what the state does not keep, such as bodies)."""
    fd = _open_regular(path, write=False)
    if fd is None:
        return
    with open(fd, "rb") as f:
        for _, where, obj in _Reader(path, f).objects():
            yield parse(obj, where=where)


def _load(
    path: Path,
    fd: int,
    *,
    lock_held: bool,
    expect_names: int,
    check: Callable[[RunHeader], None] | None,
    trust_index: bool = True,
) -> tuple[State, int | None, int, int]:
    """The State of the ledger open on `fd`, through its index: (state, offset of a torn
    tail or None, end offset of the last whole line, lines read). With `lock_held` the
    shared index is brought up to date (extended, or rebuilt) and left marked dirty until
    `Ledger.close`; without, it is used only when current, else a private one is built.

    What looks like damage when read on from where the index ends may be the index's (it
    claims a prefix it does not describe: two writers once shared the file): the ledger
    is then read again whole, and only damage found so is the ledger's."""
    state, start, lineno = _open_index(
        path, fd, lock_held=lock_held, expect_names=expect_names, trust_index=trust_index
    )
    try:
        if check is not None:
            for header in state.runs:
                check(header)
        with open(os.dup(fd), "rb") as f:
            reader = _Reader(path, f, start=start, lineno=lineno)
            fold_item = state.fold_item
            for offset, where, obj in reader.objects():
                item = item_of(obj)
                if item is not None:
                    fold_item(item, offset)
                    continue
                record = parse(obj, where=where)
                if check is not None and isinstance(record, RunHeader):
                    check(record)
                state.fold(record, offset)
    except LedgerError:
        state.close()
        if start == 0:
            raise
        index.unavailable(index.index_path(path), "it does not match the ledger", "a rebuild")
        return _load(
            path,
            fd,
            lock_held=lock_held,
            expect_names=expect_names,
            check=check,
            trust_index=False,
        )
    except BaseException:
        state.close()
        raise
    return state, reader.torn_at, reader.end, reader.lineno


def _open_index(
    path: Path, fd: int, *, lock_held: bool, expect_names: int, trust_index: bool = True
) -> tuple[State, int, int]:
    """(state so far, ledger offset and line number to read on from). Never fails for the
    index's sake: an index file that cannot be read is rebuilt, one that cannot be written
    gives way to a private file, then to memory (index module docstring)."""
    here = str(Path(os.path.realpath(path)).parent)
    ipath = index.index_path(path)
    loaded = _current_index(path, fd, ipath, here, lock_held=lock_held) if trust_index else None
    if loaded is not None:
        return loaded
    names = max(expect_names, os.fstat(fd).st_size // 600)  # a done Name: ~600 B of ledger
    table = _new_table(fd, ipath, here, slots=index.slots_for(names), shared=lock_held)
    return State(path=path, latest=table), 0, 0


def _current_index(
    path: Path, fd: int, ipath: Path, here: str, *, lock_held: bool
) -> tuple[State, int, int] | None:
    """The state kept in the shared index, if it describes this ledger (all of it, for a
    reader without the lock); else None. With the lock it is marked dirty, or, when that
    cannot be written, copied into memory and let go."""
    try:
        ifd = _open_index_file(ipath, write=lock_held)
    except OSError:
        return None  # none yet, or not ours to use: a new one is made (and says why)
    try:
        slots, used, at, trailer, salt = index.read_index(ifd, fd, checkpoint_ok=lock_held)
        size = os.fstat(fd).st_size
        if not lock_held and (at.offset != size or at.size != size):
            raise index.Stale("the ledger has grown since (a run is going on, or was killed)")
        state = State(path=path)
        where = f"{ipath} (trailer)"
        state.runs = [_trailer_record(o, where, RunHeader) for o in trailer["runs"]]
        footers = [_trailer_record(o, where, Footer) for o in trailer["footers"]]
        state.footers = {f.run_id: f for f in footers}
        state.invalid_lines = {int(line): name for line, name in trailer["invalid"]}
        ledger_fd = os.dup(fd)
    except (index.Stale, LedgerError, ValueError, TypeError, OSError):
        _close_quietly(ifd)  # rebuilt: an index we cannot read is one we do not trust
        return None
    except BaseException:
        _close_quietly(ifd)
        raise
    try:
        table = Table(
            ifd,
            slots=slots,
            used=used,
            codes=list(trailer["codes"]),
            ledger_fd=ledger_fd,
            writable=lock_held,
            tmp_dir=here,
            path=ipath,
            salt=salt,
        )
    except OSError:  # it cannot be mapped: build another (the table closed both fds)
        return None
    if lock_held:
        try:
            index.mark_checkpoint(table)
        except OSError as exc:
            index.unavailable(ipath, exc, "memory")
            try:
                table.to_memory()
            except BaseException:
                table.close()
                raise
    state.latest = table
    return state, at.offset, at.lines


def _new_table(fd: int, ipath: Path, here: str, *, slots: int, shared: bool) -> Table:
    """An empty table for a rebuild: the shared index when `shared` (a run holding the
    lock), else, or when that cannot be had, an unlinked file beside the ledger, then in the
    temporary directory, then memory. Logs `ledger.index_unavailable` once when the shared
    index, or every file, could not be used."""
    why: OSError | str | None = None
    if shared:
        # Rebuilt in a new file: whoever still maps the old one keeps reading it (a file cut
        # under a mapping would be a SIGBUS).
        with contextlib.suppress(OSError):
            os.unlink(ipath)
        try:
            return _table_in(_open_index_file(ipath, write=True), fd, slots, here, ipath)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(ipath)  # an empty or half-allocated file: nobody trusts it anyway
            why = exc
    for where in (here, None):
        try:
            private, name = tempfile.mkstemp(prefix=".worker-index-", dir=where)
        except OSError as exc:
            why = why or exc
            continue
        with contextlib.suppress(OSError):
            os.unlink(name)
        try:
            table = _table_in(private, fd, slots, here, None)
        except OSError as exc:
            why = why or exc
            continue
        if shared:
            folder = where or tempfile.gettempdir()
            index.unavailable(ipath, why or "cannot be created", f"a private file in {folder}")
        return table
    index.unavailable(ipath if shared else here, why or "no file", "memory")
    return _table_in(None, fd, slots, here, None)


def _table_in(ifd: int | None, fd: int, slots: int, here: str, shared: Path | None) -> Table:
    """An empty table in `ifd` (None: memory), marked dirty when it is the shared index.
    Raises OSError when it cannot be made; `ifd` is closed then."""
    try:
        ledger_fd = os.dup(fd)
    except BaseException:
        if ifd is not None:
            _close_quietly(ifd)
        raise
    table = Table(
        ifd,
        slots=slots,
        used=0,
        codes=[],
        ledger_fd=ledger_fd,
        writable=True,
        tmp_dir=here,
        path=shared,
    )
    if shared is not None:
        try:
            index.mark_dirty(table)
        except BaseException:
            table.close()
            raise
    return table


def _trailer_record(obj: Any, where: str, kind: type[RunHeader] | type[Footer]) -> Any:
    record = parse(obj, where=where)
    if not isinstance(record, kind):
        raise index.Stale("damaged trailer")
    return record


def _open_index_file(path: Path, *, write: bool) -> int:
    """The shared index's descriptor (created when `write`). Raises OSError when there is
    none (reading) or it cannot be used (not a regular file, no permission, a read-only
    folder): then a private one does the job."""
    flags = (os.O_RDWR | os.O_CREAT if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
    except BaseException:
        _close_quietly(fd)
        raise
    return fd


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
    ) -> Self:
        """Open (or create) the ledger of `target` at `path`, lock it, load it, cut a torn
        tail. Raises LedgerError (not a ledger, damaged, unreadable), LedgerTargetMismatch
        (another target's, or worker 0.1's) or LedgerLocked; in every case nothing in the
        file has changed. The index beside it (`<ledger>.index`) is brought up to date;
        `expect_names` (the manifest's groups) sizes a new one so it need not grow."""
        fd = _open_regular(path, write=True)
        assert fd is not None
        lock_fd = -1
        try:
            # The first header decides whose ledger this is: checked before the lock file is
            # created, so a mistyped --ledger leaves nothing behind beside a foreign file.
            with open(os.dup(fd), "rb") as f:
                first = next(iter(_Reader(path, f)), None)
            if isinstance(first, RunHeader):
                _check_target(path, first, target)
            lock_fd = lock_beside(path)
            lock_file(path, fd)
            _check_same_file(path, fd)
            state, torn_at, end, lines = _load(
                path,
                fd,
                lock_held=True,
                expect_names=expect_names,
                check=lambda header: _check_target(path, header, target),
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
            index.unavailable(table.path, exc, "a rebuild by the next run")
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
                        index.unavailable(table.path, exc, "a rebuild by the next run")
        except OSError as exc:
            self._broken = f"{self.path}: cannot sync the ledger: {exc.strerror}"
            raise LedgerWriteError(self._broken) from None
        finally:
            # `state` stays readable after close (its index is unmapped when it is let go,
            # or by state.close()).
            release(fd, self._lock_fd)


# -- opening safely -----------------------------------------------------------------------


def _open_regular(path: Path, *, write: bool) -> int | None:
    """An fd on `path` if it is (or, with `write`, can be created as) a regular file; None
    when it does not exist and `write` is off. A symbolic link is followed only to a regular
    file. O_NONBLOCK: opening a FIFO must not wait for a writer; the fstat after opening is
    the check that counts (the path may change between the stat and the open)."""
    flags = (
        (os.O_RDWR | os.O_APPEND if write else os.O_RDONLY)
        | os.O_NONBLOCK
        | os.O_NOCTTY
        | os.O_CLOEXEC
    )
    for _ in range(2):  # a second time only if the file appeared between stat and create
        create = 0
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if os.path.lexists(path):
                raise LedgerError(
                    f"{path}: is a symbolic link to {os.readlink(path)!r}, which "
                    "does not exist; a ledger must be a regular file"
                ) from None
            if not write:
                return None
            create = os.O_CREAT | os.O_EXCL  # O_EXCL: never through a link planted meanwhile
        except OSError as exc:
            raise LedgerError(f"{path}: cannot open the ledger: {exc.strerror}") from None
        else:
            _require_regular(path, st.st_mode)
        try:
            fd = os.open(path, flags | create, 0o644)
        except FileExistsError:
            continue
        except OSError as exc:
            what = "for writing" if write else "for reading"
            raise LedgerError(f"{path}: cannot open the ledger {what}: {exc.strerror}") from None
        try:
            _require_regular(path, os.fstat(fd).st_mode)
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise LedgerError(f"{path}: the file kept changing while the ledger was opened")


def _require_regular(path: Path, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = (
        "a directory"
        if stat.S_ISDIR(mode)
        else "a FIFO (named pipe)"
        if stat.S_ISFIFO(mode)
        else "a character device"
        if stat.S_ISCHR(mode)
        else "a block device"
        if stat.S_ISBLK(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "not a regular file"
    )
    raise LedgerError(f"{path}: is {kind}; a ledger must be a regular file (nothing was changed)")


def _check_same_file(path: Path, fd: int) -> None:
    """After locking: the path must still name the file we opened, or we would hold the
    path's lock while writing a file that was moved away."""
    try:
        now = os.stat(path)
    except OSError:
        now = None
    held = os.fstat(fd)
    if now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
        raise LedgerError(
            f"{path}: was moved or replaced while it was being opened; "
            "nothing was changed, run again"
        )


def _check_target(path: Path, header: RunHeader, target: Target) -> None:
    if header.target != target:
        raise LedgerTargetMismatch(
            f"{path}: this ledger belongs to {header.target}, not to {target}; nothing was "
            "sent. Use another --ledger for this target, or move this one aside"
        )


def _close_quietly(*fds: int) -> None:
    for fd in fds:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


# -- reading ------------------------------------------------------------------------------


class _Reader:
    """Decoded ledger lines, line by bounded line, from byte `start` (line `lineno` + 1 is
    the first read). After iterating, `torn_at` is the offset of a torn last line (None if
    there was none), `end` the offset after the last whole line, `lineno` the lines read;
    the reader never writes."""

    def __init__(self, path: Path, f: IO[bytes], *, start: int = 0, lineno: int = 0) -> None:
        self.path = path
        self.f = f
        self.torn_at: int | None = None
        self.end = start
        self.lineno = lineno

    def __iter__(self) -> Iterator[Record]:
        for _, where, obj in self.objects():
            yield parse(obj, where=where)

    def objects(self) -> Iterator[tuple[int, str, Any]]:
        """(offset, FILE:LINE, decoded object) per whole line."""
        self.f.seek(self.end)  # descriptors dup'ed from one open file share its offset
        offset, lineno = self.end, self.lineno
        readline, loads, name = self.f.readline, orjson.loads, str(self.path)
        while True:
            try:
                raw = readline(MAX_RECORD_BYTES + 1)
            except OSError as exc:
                raise LedgerError(f"{self.path}: cannot read the ledger: {exc.strerror}") from None
            if not raw:
                return
            lineno += 1
            if not raw.endswith(b"\n"):
                where = f"{self.path}:{lineno}"
                if len(raw) > MAX_RECORD_BYTES:
                    if lineno == 1:
                        raise self._foreign()
                    raise LedgerError(
                        f"{where}: damaged ledger record: the line is longer "
                        f"than {MAX_RECORD_BYTES} bytes"
                    )
                if lineno == 1 and not raw.startswith(_HEADER_PREFIX):
                    raise self._foreign()
                self.torn_at = offset  # the end of the file, inside a record: a crash
                return
            try:
                obj = loads(raw)
            except orjson.JSONDecodeError:
                obj = None
            if lineno == 1 and not (isinstance(obj, dict) and obj.get("type") == "run"):
                raise self._foreign()
            if obj is None:
                raise LedgerError(
                    f"{self.path}:{lineno}: damaged ledger record: the line is not JSON; "
                    "fix that line and run again (keep the ledger: it is the history of "
                    "what was sent)"
                )
            yield offset, f"{name}:{lineno}", obj
            offset += len(raw)
            self.end, self.lineno = offset, lineno

    def _foreign(self) -> LedgerError:
        return LedgerError(
            f"{self.path}: is not a worker ledger (its first line is not a "
            "run header); nothing was changed. Check --ledger"
        )
