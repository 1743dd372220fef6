"""The ledger's per-Name state, kept on disk: the hash table of `<ledger>.index` (its
header, checkpoints and trailer: index.py; its layout: layout.py).

Why on disk. A run needs, per Name, the ledger's latest word (outcome, action, fingerprint,
code, line). As Python objects that was ~300 B per Name (3 GB for ten million); even packed
into arrays it is ~60 B (the fingerprint alone is 32) plus the table's slack, which does not
fit ten million Names in 200 MB. Measured alternatives: sqlite3 point lookups cost ~12 µs
each from Python (a resume looks every manifest line up, twice), a sorted file needs ~23
probes per lookup. So the index is an open-addressing hash table of fixed 80-byte slots in a
file. Lookups read slots with `pread` (one hash and one call, ~3 µs, nothing resident);
writes go through `mmap`, whose pages are dropped from our resident set every thousand
touches (MADV_DONTNEED on a shared file mapping only unmaps them: the page cache keeps them,
dirty ones included).

Slot: see layout.py.

A slot is read only through its check. One whose check fails (a byte edited, a slot copied
from another ledger's index, whose salt differs) is never taken for the ledger's word: the
table is rebuilt from the ledger then and there, and the lookup answered from the rebuilt
one (`Table.get`). The check costs ~0.5 µs a lookup (measured: 3.6 -> 4.2 µs per lookup
over 200 000 Names). The header and the trailer carry a seal of their own (keyed blake2b-128
after the header's fields), checked before either is believed.

A cache never stops a run: see load.py; a table that cannot grow in a file goes on in memory.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import structlog

from worker.ledger.file import close_quietly, items_of, name_at
from worker.ledger.layout import (
    DIRTY_HEADER,
    EMPTY_KEY,
    HEADER_BYTES,
    MAX_LOAD,
    SALT_BYTES,
    SLOT_BYTES,
    BadSlot,
    Stale,
    decode_slot,
    encode_slot,
    name_key,
)
from worker.ledger.probe import slot_in_file
from worker.ledger.records import Item, Latest, Outcome

# Resident pages are dropped after this many touches: bounds what the mapping adds to RSS
# (a touch is at most two pages) to about 8 MB.
_DROP_EVERY: Final = 1024

_COPY_CHUNK: Final = 1 << 20

log = structlog.get_logger("worker")


def unavailable(where: Path | str, why: OSError | str, instead: str) -> None:
    """Log that an index file could not be used, and what the run uses instead."""
    reason = why if isinstance(why, str) else (why.strerror or str(why))
    log.warning("ledger.index_unavailable", index=str(where), reason=reason, instead=instead)


class Table(Mapping[str, Latest]):
    """The hash table in a file (the shared index, or a private temporary one), or in
    anonymous memory when no file could hold it (`fd=None`).

    A Mapping from Name to Latest for plan.decide and report; `put` folds one intent or
    result into it. `items()` and iteration give Names back by reading the record each slot
    points at (only `report` without a manifest does that).

    The table owns `fd` and `ledger_fd` from the call on: if it cannot be built it closes
    them before raising, so a caller never closes them twice."""

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
        self._tmp_dir = tmp_dir
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

    def _find(self, key: bytes) -> int:
        """The offset of `key`'s slot, or of the empty slot where it would go."""
        mask = self.slots - 1
        i = int.from_bytes(key[8:], "little") & mask
        mm = self._mm
        self._touches += 1
        if self._touches >= _DROP_EVERY:
            self._touches = 0
            self._drop_pages(mm)
        while True:
            at = HEADER_BYTES + i * SLOT_BYTES
            here = mm[at : at + 16]
            if here in (key, EMPTY_KEY):
                return at
            i = (i + 1) & mask

    def _entry(self, at: int) -> Latest:
        return decode_slot(self._mm, at, self.salt, self.codes)

    def __getitem__(self, name: str) -> Latest:
        got: Latest | None = self.get(name)
        if got is None:
            raise KeyError(name)
        return got

    def get(self, name: str, default: Any = None) -> Any:
        """The ledger's latest word on `name`, or `default`. A slot that fails its check is
        never an answer: the table is rebuilt from the ledger, and asked again."""
        try:
            return self._get(name, default)
        except BadSlot:
            self.rebuild()
            return self._get(name, default)

    def _get(self, name: str, default: Any) -> Any:
        """The hot path of a resume: a lookup per manifest line. A file's slots are read
        with `pread`, not through the mapping: that adds nothing to our resident set, so no
        pages need dropping (dropping and faulting them back cost twice as much, measured)."""
        key = name_key(name)
        if self._fd < 0:
            at = self._find(key)
            if self._mm[at : at + 16] == EMPTY_KEY:
                return default
            return self._entry(at)
        _, slot = slot_in_file(self._fd, self.slots, key, self.path)
        return default if slot[:16] == EMPTY_KEY else decode_slot(slot, 0, self.salt, self.codes)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        at = self._find(name_key(name))
        return self._mm[at : at + 16] != EMPTY_KEY

    def __len__(self) -> int:
        return self.used

    def _used_slots(self) -> Iterator[int]:
        mm = self._mm
        for i in range(self.slots):
            at = HEADER_BYTES + i * SLOT_BYTES
            if mm[at : at + 16] != EMPTY_KEY:
                yield at
            if i % (_DROP_EVERY * 16) == 0:
                self._drop_pages(mm)

    def _checked(self) -> None:
        """Every used slot passes its check, or the table is rebuilt from the ledger first:
        before a walk over all of them, which must not stop halfway."""
        try:
            for at in self._used_slots():
                self._entry(at)
        except BadSlot:
            self.rebuild()

    def values(self) -> Iterator[Latest]:  # type: ignore[override]
        self._checked()
        for at in self._used_slots():
            yield self._entry(at)

    def __iter__(self) -> Iterator[str]:
        for name, _ in self.items():
            yield name

    def items(self) -> Iterator[tuple[str, Latest]]:  # type: ignore[override]
        self._checked()
        for at in self._used_slots():
            yield self._name_at(at), self._entry(at)

    def _name_at(self, at: int) -> str:
        (offset,) = struct.unpack_from("<Q", self._mm, at + 56)
        if self._ledger_fd is None:
            raise Stale("no ledger to read Names from")
        return name_at(self._ledger_fd, offset)

    # -- writing ---------------------------------------------------------------------

    def put(self, item: Item, offset: int, *, bulk: bool = False) -> None:
        """Fold one intent or result, read at byte `offset` of the ledger; `bulk` for one
        of many in a row (a rebuild), not one now and then (a run's own records)."""
        assert item.name is not None
        key = name_key(item.name)
        in_file = bulk and self._fd >= 0
        if in_file:
            # pread and pwrite, not the mapping: in bulk, faulting pages in and dropping
            # them again cost more than the two calls (a rebuild's writes 9.5 -> 6 us).
            at, slot = slot_in_file(self._fd, self.slots, key, self.path)
            fresh = slot[:16] == EMPTY_KEY
        else:
            at = self._find(key)
            fresh = self._mm[at : at + 16] == EMPTY_KEY
        if item.outcome is Outcome.INVALID and not fresh:
            # An invalid line never hides what was sent for its Name (a duplicate's valid
            # line holds the Name's state); it only says a Name known for nothing else
            # was invalid.
            return
        code = self._code_no.get(item.code)
        if code is None:
            code = self._code_no[item.code] = len(self.codes)
            self.codes.append(item.code)
        slot = encode_slot(key, item, offset, code, self.salt)
        try:
            written = os.pwrite(self._fd, slot, at) if in_file else 0
        except OSError:  # a file size limit refuses a pwrite, not a store into the mapping
            written = 0
        if written != SLOT_BYTES:  # memory; or a file size limit, which spares the mapping
            at = self._find(key) if in_file else at  # the same slot; the touch is counted
            self._mm[at : at + SLOT_BYTES] = slot
        if fresh:
            self.used += 1
            if self.used > self.slots * MAX_LOAD:
                self._grow()

    def _grow(self) -> None:
        """Double the table. Into a new file that then takes the old one's place (a rename:
        anyone still mapping the old file keeps reading it, and nothing is ever cut from
        under a mapping, which would be a SIGBUS); into memory when no file can be had
        (a full disk must not stop the run: the index is a cache)."""
        if not self.in_memory:
            try:
                self._adopt(self._grown_file())
                return
            except OSError as exc:
                unavailable(self.path or self._tmp_dir, exc, "memory")
        self._adopt(self._copy(self._empty(None, self.slots * 2), rehash=True))

    def _empty(self, fd: int | None, slots: int, *, salt: bytes | None = None) -> Table:
        """A new empty table like this one, in `fd` (None: in memory); with this one's salt
        (its slots are copied as they are) unless `salt` is given."""
        return Table(
            fd,
            slots=slots,
            used=0,
            codes=self.codes,
            ledger_fd=None,
            writable=True,
            tmp_dir=self._tmp_dir,
            salt=self.salt if salt is None else salt,
        )

    def _grown_file(self) -> Table:
        fd, name = tempfile.mkstemp(prefix=".worker-index-", dir=self._tmp_dir)
        try:
            bigger = self._empty(fd, self.slots * 2)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise
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

    def rebuild(self) -> None:
        """Fold the whole ledger again into a new table (a new salt), which takes this one's
        place: the shared index's file for a run holding the lock (left unmarked, so nobody
        trusts it until the run seals it), else a private file or memory. For a slot that
        failed its check: the index is derived, the ledger says what is true."""
        if self._ledger_fd is None:
            raise Stale("a slot failed its check, and there is no ledger to rebuild from")
        log.warning("ledger.index_rebuilt", index=str(self.path or "private"), reason="bad slot")
        shared = self.path if self._writable and not self.in_memory else None
        name = None
        try:
            fd, name = tempfile.mkstemp(prefix=".worker-index-", dir=self._tmp_dir)
            fresh = self._empty(fd, self.slots, salt=os.urandom(SALT_BYTES))
        except OSError as exc:
            if name is not None:
                with contextlib.suppress(OSError):
                    os.unlink(name)
            unavailable(self.path or self._tmp_dir, exc, "memory")
            name, fresh = None, self._empty(None, self.slots, salt=os.urandom(SALT_BYTES))
        try:
            for item, offset in items_of(self._ledger_fd):
                fresh.put(item, offset, bulk=True)
            if name is not None:
                if shared is not None:
                    os.replace(name, shared)
                else:
                    os.unlink(name)
        except BaseException:
            fresh.close()
            if name is not None:
                with contextlib.suppress(OSError):
                    os.unlink(name)
            raise
        if shared is None:
            self.path = None  # a reader's private copy: never written over the shared one
        self._adopt(fresh)  # into memory, it lets go of the shared index (see _adopt)
        self.used, self.salt = fresh.used, fresh.salt

    def to_memory(self) -> None:
        """Go on in anonymous memory with the same contents, and let go of the file (it
        could not be marked dirty: this run must not change it)."""
        self._adopt(self._copy(self._empty(None, self.slots), rehash=False))

    def _copy(self, into: Table, *, rehash: bool) -> Table:
        """Every slot into `into` (a table of any size when `rehash`, else of this size),
        and the header (the dirty mark)."""
        old, new = self._mm, into._mm
        if not rehash:
            for start in range(0, len(old), _COPY_CHUNK):
                new[start : start + _COPY_CHUNK] = old[start : start + _COPY_CHUNK]
            return into
        mask = into.slots - 1
        for i in range(self.slots):
            at = HEADER_BYTES + i * SLOT_BYTES
            slot = old[at : at + SLOT_BYTES]
            if slot[:16] == EMPTY_KEY:
                continue
            j = int.from_bytes(slot[8:16], "little") & mask
            while True:
                to = HEADER_BYTES + j * SLOT_BYTES
                if new[to : to + 16] == EMPTY_KEY:
                    new[to : to + SLOT_BYTES] = slot
                    break
                j = (j + 1) & mask
            if i % (_DROP_EVERY * 16) == 0:
                self._drop_pages(old)
                into._drop_pages(new)
        # Dirty: nothing of the new file is on disk yet, whatever the old header said (a
        # checkpoint of the old file describes nothing in this one).
        new[:HEADER_BYTES] = DIRTY_HEADER
        return into

    def _adopt(self, other: Table) -> None:
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
