"""Where an index table lives: its file (the shared index, or a private temporary one) and
the mapping of it, or anonymous memory when no file can hold it; how it grows, moves to
memory, takes another file's place and is let go. The table's contents: table.py.

A cache never stops a run: see load.py; a table that cannot grow in a file goes on in memory.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from pathlib import Path
from typing import Final, Self

import structlog

from worker.ledger.file import close_quietly
from worker.ledger.layout import (
    DIRTY_HEADER,
    HEADER_BYTES,
    SALT_BYTES,
    SLOT_BYTES,
    rehash_into,
    slots_for,
)

# Resident pages are dropped after this many touches: bounds what the mapping adds to RSS
# (a touch is at most two pages) to about 8 MB.
DROP_EVERY: Final = 1024

_COPY_CHUNK: Final = 1 << 20

log = structlog.get_logger("worker")


def unavailable(where: Path | str, why: OSError | str, instead: str) -> None:
    """Log that an index file could not be used, and what the run uses instead."""
    reason = why if isinstance(why, str) else (why.strerror or str(why))
    log.warning("ledger.index_unavailable", index=str(where), reason=reason, instead=instead)


class Storage:
    """A table's slots in a file (`fd`), or in anonymous memory (`fd=None`); the table of
    table.py reads and writes them.

    It owns `fd` and `ledger_fd` from the call on: if it cannot be built it closes them
    before raising, so a caller never closes them twice."""

    def __init__(
        self,
        fd: int | None,
        *,
        slots: int,
        used: int,
        codes: list[str],
        ledger_fd: int | None,
        writable: bool,
        tmp_dir: str,
        path: Path | None = None,
        salt: bytes | None = None,
    ) -> None:
        # The descriptors become ours only once the mapping exists: a table that could not
        # be built has closed them here, and its `close` (its finalizer) finds nothing to do.
        self.path = path  # the shared index's path; None for a private one
        self._fd = -1
        self._ledger_fd: int | None = None
        self.tmp_dir = tmp_dir
        self.slots = slots
        self.used = used
        self.codes = codes
        # None: a new table, whose slots are checked with a salt of its own.
        self.salt = os.urandom(SALT_BYTES) if salt is None else salt
        self._code_no = {c: i for i, c in enumerate(codes)}
        self._writable = writable or fd is None
        self._touches = 0
        try:
            self._mm = _closed_map()
            mm = self._map(fd, slots)
        except BaseException:
            close_quietly(fd, ledger_fd)
            raise
        self._fd = -1 if fd is None else fd
        self._ledger_fd = ledger_fd
        self._mm = mm

    @property
    def in_memory(self) -> bool:
        """Held in anonymous memory: no file could be used."""
        return self._fd < 0 and not self._mm.closed

    def __repr__(self) -> str:
        where = "memory" if self.in_memory else str(self.path or "private file")
        status = "closed" if self._mm.closed else f"{self.used}/{self.slots}"
        return f"<Table {where} {status}>"

    def _map(self, fd: int | None, slots: int) -> mmap.mmap:
        size = HEADER_BYTES + slots * SLOT_BYTES
        if fd is None:
            # MAP_SHARED | MAP_ANONYMOUS: pages come from memory, never from a disk.
            mm = mmap.mmap(-1, size)
        else:
            if self._writable:
                # Blocks are reserved, not left sparse: a store into a mapped hole on a full
                # disk is a SIGBUS; this way a full disk is an OSError here instead.
                os.posix_fallocate(fd, 0, size)
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if self._writable else 0)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)
        mm.madvise(mmap.MADV_RANDOM)
        return mm

    def _drop_pages(self, mm: mmap.mmap) -> None:
        """Unmap resident pages of a file mapping (the page cache keeps them). Not for
        memory: there MADV_DONTNEED would only hide shared anonymous pages from our
        resident set, not free them, and RSS should say what the table costs."""
        if not self.in_memory:
            mm.madvise(mmap.MADV_DONTNEED)

    # -- reading ---------------------------------------------------------------------

    def write_slots(self, first: int, data: bytes | bytearray) -> None:
        """Whole slots, laid out elsewhere (build.py), from slot number `first` on."""
        at = HEADER_BYTES + first * SLOT_BYTES
        try:
            written = os.pwrite(self._fd, data, at) if self._fd >= 0 else 0
        except OSError:  # as in put_slot: the mapping takes what a pwrite refused
            written = 0
        if written != len(data):
            self._mm[at : at + len(data)] = data

    def _grow(self, slots: int) -> None:
        """Grow the table to `slots`. Into a new file that then takes the old one's place (a
        rename: anyone still mapping the old file keeps reading it, and nothing is ever cut
        from under a mapping, which would be a SIGBUS); into memory when no file can be had
        (a full disk must not stop the run: the index is a cache)."""
        if not self.in_memory:
            try:
                self._adopt(self._grown_file(slots))
                return
            except OSError as exc:
                unavailable(self.path or self.tmp_dir, exc, "memory")
        self._adopt(self._copy(self._empty(None, slots), rehash=True))

    def reserve(self, names: int) -> None:
        """Room for `names` Names (more slots, if need be) in a table still empty."""
        assert self.used == 0
        if slots_for(names) > self.slots:
            self._grow(slots_for(names))

    def _empty(self, fd: int | None, slots: int, *, salt: bytes | None = None) -> Self:
        """A new empty table like this one, in `fd` (None: in memory); with this one's salt
        (its slots are copied as they are) unless `salt` is given."""
        return type(self)(
            fd,
            slots=slots,
            used=0,
            codes=self.codes,
            ledger_fd=None,
            writable=True,
            tmp_dir=self.tmp_dir,
            salt=self.salt if salt is None else salt,
        )

    def _new_file(self, slots: int, salt: bytes) -> tuple[str, Self]:
        """(its name, an empty table in a new file beside this one); nothing left behind
        when it cannot be made."""
        fd, name = tempfile.mkstemp(prefix=".worker-index-", dir=self.tmp_dir)
        try:
            return name, self._empty(fd, slots, salt=salt)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise

    def _grown_file(self, slots: int) -> Self:
        name, bigger = self._new_file(slots, self.salt)
        try:
            self._copy(bigger, rehash=True)
            if self.path is not None:
                os.replace(name, self.path)
            else:
                os.unlink(name)
        except BaseException:
            bigger.close()
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise
        return bigger

    def to_memory(self) -> None:
        """Go on in anonymous memory with the same contents, and let go of the file (it
        could not be marked dirty: this run must not change it)."""
        self._adopt(self._copy(self._empty(None, self.slots), rehash=False))

    def _copy(self, into: Self, *, rehash: bool) -> Self:
        """Every slot into `into` (a table of any size when `rehash`, else of this size),
        and the header (the dirty mark)."""
        old, new = self._mm, into._mm
        if self.used == 0:  # nothing to copy (a bulk build's table made bigger first)
            new[:HEADER_BYTES] = DIRTY_HEADER
            return into
        if not rehash:
            for start in range(0, len(old), _COPY_CHUNK):
                new[start : start + _COPY_CHUNK] = old[start : start + _COPY_CHUNK]
            return into
        for _ in rehash_into(old, self.slots, new, into.slots, every=DROP_EVERY * 16):
            self._drop_pages(old)
            into._drop_pages(new)
        # Dirty: nothing of the new file is on disk yet, whatever the old header said (a
        # checkpoint of the old file describes nothing in this one).
        new[:HEADER_BYTES] = DIRTY_HEADER
        return into

    def _adopt(self, other: Storage) -> None:
        """Take `other`'s file and mapping in place of ours (same contents, maybe bigger).
        Going to memory lets go of the shared index: it stays as it was (marked dirty by a
        run, or clean for the prefix it covers), and is removed if it can be."""
        if other.in_memory and self.path is not None and self._writable:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = None
        old_mm, old_fd = self._mm, self._fd
        self._mm, self._fd, self.slots = other._mm, other._fd, other.slots
        self._writable = True
        other._mm, other._fd = _closed_map(), -1  # ours now
        with contextlib.suppress(OSError, BufferError):
            old_mm.close()
        close_quietly(old_fd)

    def flush(self) -> None:
        if self._writable and not self.in_memory:
            self._mm.flush()

    def close(self) -> None:
        """Unmap and close the file. Idempotent, and quiet: the index is a cache, and what
        had to reach the disk was fsynced by `finish`."""
        mm, self._mm = self._mm, _closed_map()
        fds, self._fd, self._ledger_fd = (self._fd, self._ledger_fd), -1, None
        try:
            if not mm.closed:
                mm.close()
        finally:
            close_quietly(*fds)

    def __del__(self) -> None:
        # A finalizer that raises prints "Exception ignored in ..."; there is nobody to tell.
        with contextlib.suppress(Exception):
            self.close()


def _closed_map() -> mmap.mmap:
    """A closed mapping: what a table holds before it is built and after it is closed."""
    mm = mmap.mmap(-1, 1)
    mm.close()
    return mm
