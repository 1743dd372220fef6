"""Reading a ledger into its State, through the index beside it: `read_state` for readers
without the lock (dry runs, `report`), `load_state` for a run holding it (`Ledger.open`).

The index is derived: one that does not match its ledger is rebuilt, never a reason to
refuse the ledger (`load_state`). Which table a load folds into: the shared index when it
is current (or, for a run holding the lock, a checkpoint to read on from), else a new one
(`_new_table`: the shared file for a run, else private, else memory).

A cache never stops a run. When the index cannot be created, extended, mapped or marked
(a full disk, a file size limit, a read-only folder, a quota, a failed mmap), the table
falls back to an unlinked file in the temporary directory, and then to anonymous shared
memory (sized by the manifest: fine at moderate sizes); `ledger.index_unavailable` is
logged with the reason. A run that falls back removes the shared index (best effort);
whatever it cannot remove is either untouched since it was last made clean (still true of
the ledger prefix it covers) or marked dirty, so no later run trusts a half-written one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from worker.errors import LedgerError
from worker.ledger import index
from worker.ledger.batch import Batch
from worker.ledger.build import Bulk, OnRegion
from worker.ledger.fast import item_of_line
from worker.ledger.file import Reader, close_quietly, open_regular
from worker.ledger.layout import Stale, slots_for
from worker.ledger.records import Footer, Intent, Item, Record, Result, RunHeader
from worker.ledger.schema import item_of, parse
from worker.ledger.state import State
from worker.ledger.storage import unavailable
from worker.ledger.table import Table


def read_state(path: Path) -> State:
    """Load without locking, repairing or checking the target (dry runs and reports). A
    missing file is an empty ledger; a torn tail is skipped; anything else is refused.
    Uses the ledger's index if it is clean and covers the whole ledger, else builds a
    private one, in a file or else in memory (only a run, holding the lock, writes the
    shared index). Close the State (or let it go) to release the index."""
    fd = open_regular(path, write=False)
    if fd is None:
        return State(path=path)
    try:
        with open(os.dup(fd), "rb") as f:
            next(iter(Reader(path, f)), None)  # refuses a file that is not a ledger
        state, torn_at, _, _ = load_state(path, fd, lock_held=False, expect_names=0, check=None)
    except OSError as exc:  # not the index's: it falls back on its own (out of memory, fds)
        raise LedgerError(f"{path}: cannot read the ledger: {exc.strerror}") from None
    finally:
        os.close(fd)
    state.torn_tail = torn_at is not None
    return state


def records_of(path: Path) -> Iterator[Record]:
    """Every record of the ledger at `path`, streamed, as `read_state` reads them (a second
    pass for what the state does not keep, such as bodies)."""
    fd = open_regular(path, write=False)
    if fd is None:
        return
    with open(fd, "rb") as f:
        reader = Reader(path, f)
        for _, lineno, obj in reader.objects():
            yield parse(obj, where=reader.where(lineno))


def load_state(
    path: Path,
    fd: int,
    *,
    lock_held: bool,
    expect_names: int,
    check: Callable[[RunHeader], None] | None,
    trust_index: bool = True,
    prebuilt: Prebuilt | None = None,
) -> tuple[State, int | None, int, int]:
    """The State of the ledger open on `fd`, through its index: (state, offset of a torn
    tail or None, end offset of the last whole line, lines read). With `lock_held` the
    shared index is brought up to date (extended, or rebuilt) and left marked dirty until
    `Ledger.close`; without, it is used only when current, else a private one is built.

    What looks like damage when read on from where the index ends may be the index's (it
    claims a prefix it does not describe: two writers once shared the file): the ledger
    is then read again whole, and only damage found so is the ledger's."""
    state, start, lineno = _open_index(
        path,
        fd,
        lock_held=lock_held,
        expect_names=expect_names,
        trust_index=trust_index,
        prebuilt=prebuilt,
    )
    try:
        if check is not None:
            for header in state.runs:
                check(header)
        with open(os.dup(fd), "rb") as f:
            reader = Reader(path, f, start=start, lineno=lineno)
            fold(reader, state, check)
    except LedgerError:
        state.close()
        if start == 0:
            raise
        unavailable(index.index_path(path), "it does not match the ledger", "a rebuild")
        return load_state(
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


def fold(
    reader: Reader,
    state: State,
    check: Callable[[RunHeader], None] | None,
    *,
    still_wanted: Callable[[], bool] = lambda: True,
    on_region: OnRegion | None = None,
) -> None:
    """Fold every record `reader` reads into `state`: a whole ledger in bulk into a new
    table (build.py), the rest of one (read on from where its index ends) a chunk at a
    time into the table that holds the start (batch.py). `still_wanted` is asked between
    chunks of lines (a prebuild's child stops when its parent is gone); `on_region` is a
    bulk build's (build.Bulk)."""
    empty = isinstance(state.latest, Table) and state.latest.used == 0
    batch = Bulk(state, on_region) if empty and reader.end == 0 else Batch(state)
    try:
        add, fast = batch.add, item_of_line
        for lines in reader.chunks():
            if not still_wanted():
                raise OSError(errno.ECANCELED, "no longer wanted")
            # `offsets` holds one more: the end of the last line
            pairs = zip(lines.offsets, lines.lines, strict=False)
            for at, (offset, raw) in enumerate(pairs, lines.first):
                # The file's first line is a run header, checked as such by the reader.
                item = fast(raw) if at != 1 else None
                if item is None:
                    item = _slow(reader, raw, at, offset, state, check)
                if item is not None:
                    add(item, offset)
        batch.flush()
    finally:
        batch.close()


def _slow(
    reader: Reader,
    raw: bytes,
    lineno: int,
    offset: int,
    state: State,
    check: Callable[[RunHeader], None] | None,
) -> Item | None:
    """A line the fast path (fast.py) did not vouch for, read as the reader reads every
    line: its intent or result, for the batch (which keeps the order); another record is
    folded into `state` here. Damage raises LedgerError naming the file and line."""
    obj = reader.decode(raw, lineno)
    item = item_of(obj)
    if item is not None:
        return item
    record = parse(obj, where=reader.where(lineno))
    if isinstance(record, (Intent, Result)):
        return Item.of(record)
    if check is not None and isinstance(record, RunHeader):
        check(record)
    state.fold(record, offset)
    return None


class Prebuilt(Protocol):
    """An index being rebuilt beside the ledger by another process (prebuild.py)."""

    def take(self) -> int | None: ...  # wait for it: its unnamed file, or None
    def cancel(self) -> None: ...  # not needed after all


def _open_index(
    path: Path,
    fd: int,
    *,
    lock_held: bool,
    expect_names: int,
    trust_index: bool = True,
    prebuilt: Prebuilt | None = None,
) -> tuple[State, int, int]:
    """(state so far, ledger offset and line number to read on from). Never fails for the
    index's sake: an index file that cannot be read is rebuilt (by `prebuilt` when one is
    being made: a run holding the lock names it the index, then reads it as it would any),
    one that cannot be written gives way to a private file, then to memory (module
    docstring)."""
    here = str(Path(os.path.realpath(path)).parent)
    ipath = index.index_path(path)
    loaded = _current_index(path, fd, ipath, here, lock_held=lock_held) if trust_index else None
    if prebuilt is not None:
        if loaded is None and lock_held and trust_index and _named(prebuilt.take(), ipath):
            loaded = _current_index(path, fd, ipath, here, lock_held=True)
        prebuilt.cancel()
    if loaded is not None:
        return loaded
    names = max(expect_names, os.fstat(fd).st_size // 600)  # a done Name: ~600 B of ledger
    table = _new_table(fd, ipath, here, slots=slots_for(names), shared=lock_held)
    return State(path=path, latest=table), 0, 0


def _named(fd: int | None, ipath: Path) -> bool:
    """Give the unnamed index file `fd` (O_TMPFILE) the index's name, in place of whatever
    was there (not current: it was just read); then close `fd`."""
    if fd is None:
        return False
    folder = -1
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ipath)
        # linkat(AT_SYMLINK_FOLLOW) through /proc: os.link calls plain link(), which would
        # link the /proc entry itself (EXDEV), unless given a directory descriptor.
        folder = os.open(ipath.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        os.link(f"/proc/self/fd/{fd}", ipath.name, dst_dir_fd=folder, follow_symlinks=True)
    except OSError:
        return False
    finally:
        close_quietly(fd, folder)
    return True


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
            raise Stale("the ledger has grown since (a run is going on, or was killed)")
        state = State(path=path)
        where = f"{ipath} (trailer)"
        state.runs = [_trailer_record(o, where, RunHeader) for o in trailer["runs"]]
        footers = [_trailer_record(o, where, Footer) for o in trailer["footers"]]
        state.footers = {f.run_id: f for f in footers}
        state.invalid_lines = {int(line): name for line, name in trailer["invalid"]}
        ledger_fd = os.dup(fd)
    except (Stale, LedgerError, ValueError, TypeError, OSError):
        close_quietly(ifd)  # rebuilt: an index we cannot read is one we do not trust
        return None
    except BaseException:
        close_quietly(ifd)
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
            unavailable(ipath, exc, "memory")
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
            unavailable(ipath, why or "cannot be created", f"a private file in {folder}")
        return table
    unavailable(ipath if shared else here, why or "no file", "memory")
    return _table_in(None, fd, slots, here, None)


def _table_in(ifd: int | None, fd: int, slots: int, here: str, shared: Path | None) -> Table:
    """An empty table in `ifd` (None: memory), marked dirty when it is the shared index.
    Raises OSError when it cannot be made; `ifd` is closed then."""
    try:
        ledger_fd = os.dup(fd)
    except BaseException:
        if ifd is not None:
            close_quietly(ifd)
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
        raise Stale("damaged trailer")
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
        close_quietly(fd)
        raise
    return fd
