"""The ledger's per-Name state, kept on disk: `<ledger>.index`, derived from the ledger.

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

Slot: blake2b-128 of the Name (UTF-8), sha256 fingerprint (32 raw bytes), manifest line,
byte offset of the record that set it (to give the Name back for `items`), outcome, action,
flags, code (an index into the codes list), and a check: keyed blake2b-64 of the rest of
the slot, keyed with a random salt drawn for each table and kept in the header. Keys are
128-bit hashes, not Names: two distinct Names share a key with probability about n²/2¹²⁹,
≈ 1.5e-25 for ten million Names, far below the chance of a disk returning wrong bytes
undetected; that is the argument for not storing the Name (which would double the slot).

A slot is read only through its check. One whose check fails (a byte edited, a slot copied
from another ledger's index, whose salt differs) is never taken for the ledger's word: the
table is rebuilt from the ledger then and there, and the lookup answered from the rebuilt
one (`Table.get`). The check costs ~0.5 µs a lookup (measured: 3.6 -> 4.2 µs per lookup
over 200 000 Names). The header and the trailer carry a seal of their own (keyed blake2b-128
after the header's fields), checked before either is believed.

Derived, never trusted over the ledger. The header records what the index was made from:
the ledger's device and inode, the byte offset and line count it covers, the ledger's size
and mtime when it was last brought up to date, sha256 of the ledger's first line (its first
run header: a random run id, so another ledger never matches) and of the 4 KiB before the
covered offset. The index is used only when all of them match and it is marked clean (or,
for a run holding the lock, a checkpoint: below); a ledger that grew (a run appended to it)
is read from the covered offset on and folded in; on any other mismatch, damage, a dirty
mark or another version, it is rebuilt from the whole ledger. A hand edit inside the
ledger that keeps its size and is followed by an append is not noticed (the ledger is
append-only by contract; the 4 KiB before the covered offset are checked).

Who writes it. Only a process holding the ledger's lock (`Ledger.open`): before the first
change it marks a current index a CHECKPOINT of what it covers (a new one: dirty), folds
what the run appends into it, every CHECKPOINT_S records a checkpoint up to what the
ledger's last fsync covered, and at close, after the ledger's fsync, writes the trailer
(codes, run headers, footers, the last run's invalid lines) and a clean header. So a run
killed with `kill -9` leaves a checkpoint, and the next run reads the ledger on from it
instead of rebuilding from the whole ledger. A reader without the lock (`read_state`: dry runs,
`report`) uses the index only if it is clean and covers the ledger exactly; otherwise it
builds a private one in an unlinked temporary file beside the ledger.

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
import hashlib
import mmap
import operator
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson
import structlog

from worker.errors import LedgerError
from worker.ledger.records import Action, Intent, Item, Latest, Outcome, Result
from worker.ledger.schema import item_of, parse

MAGIC: Final = b"WKIDX\x00\x00\x02"  # the last byte is the format version
_HEAD = struct.Struct("<8sIIQQQQQQQQQ32s32s16s")  # see _Header.pack
HEADER_BYTES: Final = 4096
# A slot: what it says (_BODY), then its check (CHECK_BYTES, see _check).
_BODY = struct.Struct("<16s32sQQBBBxI")
_BODY_BYTES: Final = _BODY.size  # 72
CHECK_BYTES: Final = 8
SLOT_BYTES: Final = _BODY_BYTES + CHECK_BYTES  # 80
SALT_BYTES: Final = 16
TAIL_CHECK_BYTES: Final = 4096
MIN_SLOTS: Final = 1 << 12
MAX_LOAD: Final = 0.6  # linear probing stays near 1.5 probes per lookup below this
# Resident pages are dropped after this many touches: bounds what the mapping adds to RSS
# (a touch is at most two pages) to about 8 MB.
_DROP_EVERY: Final = 1024
_MAX_TRAILER: Final = 256 << 20

_OUTCOMES: Final = (None, *Outcome)
_ACTIONS: Final = (None, *Action)
_OUTCOME_NO: Final = {o: i for i, o in enumerate(_OUTCOMES)}
_ACTION_NO: Final = {a: i for i, a in enumerate(_ACTIONS)}
_HAS_FP: Final = 1
_EMPTY_KEY: Final = bytes(16)
_COPY_CHUNK: Final = 1 << 20
_PROBE_SLOTS: Final = 2
# The header's state. DIRTY: being changed, trusted by nobody. CLEAN: describes the covered
# ledger prefix exactly. CHECKPOINT: holds every record of the covered prefix, and maybe
# some after it (a run went on writing): trusted only by a run holding the lock, which
# folds the ledger in again from the covered offset (folding a record twice is harmless:
# a Name's word is its latest record's) and counts the used slots afresh.
DIRTY: Final = 0
CLEAN: Final = 1
CHECKPOINT: Final = 2

log = structlog.get_logger("worker")


class Stale(Exception):
    """The index does not describe this ledger (or is damaged): rebuild it."""


class _BadSlot(Exception):
    """A slot whose check fails: its bytes are not what this table wrote."""


def _check(salt: bytes, body: bytes) -> bytes:
    """The slot's check: keyed by the table's salt, so a slot copied from another table
    (another ledger's index, or an older index of this one) fails like an edited one."""
    return hashlib.blake2b(body, key=salt, digest_size=CHECK_BYTES).digest()


def index_path(ledger: Path) -> Path:
    real = Path(os.path.realpath(ledger))
    return real.with_name(real.name + ".index")


def name_key(name: str) -> bytes:
    key = hashlib.blake2b(name.encode(), digest_size=16).digest()
    return key if key != _EMPTY_KEY else b"\x01" + key[1:]  # all-zero marks an empty slot


def unavailable(where: Path | str, why: OSError | str, instead: str) -> None:
    """Log that an index file could not be used, and what the run uses instead."""
    reason = why if isinstance(why, str) else (why.strerror or str(why))
    log.warning("ledger.index_unavailable", index=str(where), reason=reason, instead=instead)


def slots_for(names: int) -> int:
    slots = MIN_SLOTS
    while names > slots * MAX_LOAD:
        slots <<= 1
    return slots


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
            _close_fds(fd, ledger_fd)
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
            if here in (key, _EMPTY_KEY):
                return at
            i = (i + 1) & mask

    def _entry(self, at: int) -> Latest:
        return self._unpack(self._mm, at)

    def _unpack(self, buffer: Any, at: int) -> Latest:
        """The slot at `at` of `buffer`; raises _BadSlot when its check fails."""
        body = bytes(buffer[at : at + _BODY_BYTES])
        if _check(self.salt, body) != buffer[at + _BODY_BYTES : at + SLOT_BYTES]:
            raise _BadSlot
        _, fp, line, _, outcome, action, flags, code = _BODY.unpack(body)
        if outcome >= len(_OUTCOMES) or action >= len(_ACTIONS) or code >= len(self.codes):
            raise _BadSlot  # checked, yet not ours (an index of another build): not trusted
        return Latest(
            _OUTCOMES[outcome],
            _ACTIONS[action],
            fp if flags & _HAS_FP else None,
            self.codes[code],
            line,
        )

    def __getitem__(self, name: str) -> Latest:
        missing = object()
        got = self.get(name, missing)
        if got is missing:
            raise KeyError(name)
        assert isinstance(got, Latest)
        return got

    def get(self, name: str, default: Any = None) -> Any:
        """The ledger's latest word on `name`, or `default`. A slot that fails its check is
        never an answer: the table is rebuilt from the ledger, and asked again."""
        try:
            return self._get(name, default)
        except _BadSlot:
            self.rebuild()
            return self._get(name, default)

    def _get(self, name: str, default: Any) -> Any:
        """The hot path of a resume: a lookup per manifest line. A file's slots are read
        with `pread`, not through the mapping: that adds nothing to our resident set, so no
        pages need dropping (dropping and faulting them back cost twice as much, measured)."""
        if self._fd < 0:
            at = self._find(name_key(name))
            if self._mm[at : at + 16] == _EMPTY_KEY:
                return default
            return self._entry(at)
        key = name_key(name)
        mask = self.slots - 1
        i = int.from_bytes(key[8:], "little") & mask
        while True:
            # Two slots at a time: linear probing rarely needs more below MAX_LOAD.
            run = min(_PROBE_SLOTS, self.slots - i)
            chunk = os.pread(self._fd, run * SLOT_BYTES, HEADER_BYTES + i * SLOT_BYTES)
            for at in range(0, len(chunk), SLOT_BYTES):
                here = chunk[at : at + 16]
                if here == key:
                    return self._unpack(chunk, at)
                if here == _EMPTY_KEY:
                    return default
            if len(chunk) < run * SLOT_BYTES:
                raise OSError(errno.EIO, f"{self.path or 'the index'} is shorter than its table")
            i = (i + run) & mask

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        at = self._find(name_key(name))
        return self._mm[at : at + 16] != _EMPTY_KEY

    def __len__(self) -> int:
        return self.used

    def _used_slots(self) -> Iterator[int]:
        mm = self._mm
        for i in range(self.slots):
            at = HEADER_BYTES + i * SLOT_BYTES
            if mm[at : at + 16] != _EMPTY_KEY:
                yield at
            if i % (_DROP_EVERY * 16) == 0:
                self._drop_pages(mm)

    def _checked(self) -> None:
        """Every used slot passes its check, or the table is rebuilt from the ledger first:
        before a walk over all of them, which must not stop halfway."""
        try:
            for at in self._used_slots():
                self._entry(at)
        except _BadSlot:
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
        raw = os.pread(self._ledger_fd, 1 << 16, offset)
        while b"\n" not in raw and len(raw) < (8 << 20):  # a record holding a big body
            more = os.pread(self._ledger_fd, 1 << 20, offset + len(raw))
            if not more:
                break
            raw += more
        name = orjson.loads(raw.partition(b"\n")[0]).get("name")
        if not isinstance(name, str):
            raise Stale(f"the record at byte {offset} holds no Name")
        return name

    # -- writing ---------------------------------------------------------------------

    def put(self, item: Item, offset: int) -> None:
        """Fold one intent or result, read at byte `offset` of the ledger."""
        assert item.name is not None
        key = name_key(item.name)
        at = self._find(key)
        fresh = self._mm[at : at + 16] == _EMPTY_KEY
        if item.outcome is Outcome.INVALID and not fresh:
            # An invalid line never hides what was sent for its Name (a duplicate's valid
            # line holds the Name's state); it only says a Name known for nothing else
            # was invalid.
            return
        code = self._code_no.get(item.code)
        if code is None:
            code = self._code_no[item.code] = len(self.codes)
            self.codes.append(item.code)
        fp = bytes.fromhex(item.fingerprint) if item.fingerprint is not None else bytes(32)
        body = _BODY.pack(
            key,
            fp,
            item.line,
            offset,
            _OUTCOME_NO[item.outcome],
            _ACTION_NO[item.action],
            _HAS_FP if item.fingerprint is not None else 0,
            code,
        )
        self._mm[at : at + SLOT_BYTES] = body + _check(self.salt, body)
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
            for item, offset in _items_of(self._ledger_fd):
                fresh.put(item, offset)
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
            if slot[:16] == _EMPTY_KEY:
                continue
            j = int.from_bytes(slot[8:16], "little") & mask
            while True:
                to = HEADER_BYTES + j * SLOT_BYTES
                if new[to : to + 16] == _EMPTY_KEY:
                    new[to : to + SLOT_BYTES] = slot
                    break
                j = (j + 1) & mask
            if i % (_DROP_EVERY * 16) == 0:
                self._drop_pages(old)
                into._drop_pages(new)
        # Dirty: nothing of the new file is on disk yet, whatever the old header said (a
        # checkpoint of the old file describes nothing in this one).
        new[:HEADER_BYTES] = _HEAD.pack(
            MAGIC, DIRTY, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, bytes(32), bytes(32), bytes(SALT_BYTES)
        ).ljust(HEADER_BYTES, b"\0")
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
        _close_fds(old_fd)

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
            _close_fds(*fds)

    def __del__(self) -> None:
        # A finalizer that raises prints "Exception ignored in ..."; there is nobody to tell.
        with contextlib.suppress(Exception):
            self.close()


def _items_of(ledger_fd: int) -> Iterator[tuple[Item, int]]:
    """(item, its offset) for every whole intent or result line of the ledger, in order.
    The ledger was read whole when it was opened: a line that does not parse now is skipped
    here (it is the ledger's reader that says what is damage)."""
    offset, pending = 0, b""
    while True:
        chunk = os.pread(ledger_fd, _COPY_CHUNK, offset + len(pending))
        if not chunk:
            return
        pending += chunk
        start = 0
        while (end := pending.find(b"\n", start)) >= 0:
            raw = pending[start : end + 1]
            try:
                obj = orjson.loads(raw)
                item = item_of(obj) if isinstance(obj, dict) else None
                if item is None and isinstance(obj, dict) and obj.get("type") in _ITEMS:
                    record = parse(obj, where="index rebuild")
                    assert isinstance(record, (Intent, Result))
                    item = Item.of(record)
            except (orjson.JSONDecodeError, LedgerError):
                item = None
            if item is not None and item.name is not None:
                yield item, offset + start
            start = end + 1
        offset, pending = offset + start, pending[start:]


_ITEMS: Final = ("intent", "result")


def _closed_map() -> mmap.mmap:
    """A closed mapping: what a table holds before it is built and after it is closed."""
    mm = mmap.mmap(-1, 1)
    mm.close()
    return mm


def _close_fds(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None and fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


# -- what an index was made from, and the file's header and trailer -------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Covered:
    """The ledger bytes an index describes: [0, offset), `lines` lines, of the file
    (dev, ino) whose size and mtime were these when the index was last made current."""

    dev: int
    ino: int
    offset: int
    lines: int
    size: int
    mtime_ns: int
    head_sha: bytes  # sha256 of the ledger's first line
    tail_sha: bytes  # sha256 of the TAIL_CHECK_BYTES before `offset`


def covered(ledger_fd: int, offset: int, lines: int) -> Covered:
    st = os.fstat(ledger_fd)
    return Covered(
        dev=st.st_dev,
        ino=st.st_ino,
        offset=offset,
        lines=lines,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        head_sha=_head_sha(ledger_fd),
        tail_sha=_tail_sha(ledger_fd, offset),
    )


def _head_sha(fd: int) -> bytes:
    first = b""
    while b"\n" not in first and len(first) < (4 << 20):
        more = os.pread(fd, 1 << 16, len(first))
        if not more:
            break
        first += more
    return hashlib.sha256(first.partition(b"\n")[0]).digest()


def _tail_sha(fd: int, offset: int) -> bytes:
    start = max(0, offset - TAIL_CHECK_BYTES)
    return hashlib.sha256(os.pread(fd, offset - start, start)).digest()


def _write_header(
    fd: int,
    *,
    state: int,
    slots: int,
    used: int,
    at: Covered,
    trailer_len: int,
    salt: bytes = bytes(SALT_BYTES),
    trailer: bytes = b"",
) -> None:
    data = _HEAD.pack(
        MAGIC,
        state,
        0,
        slots,
        used,
        at.dev,
        at.ino,
        at.offset,
        at.lines,
        at.size,
        at.mtime_ns,
        trailer_len,
        at.head_sha,
        at.tail_sha,
        salt,
    )
    _pwrite_all(fd, data + _seal_of(data, trailer), 0)


def _seal_of(head: bytes, trailer: bytes) -> bytes:
    """The header's and trailer's check, keyed by the salt in the header: an index whose
    header or trailer was edited (or put together from two indexes) is rebuilt. The state
    field is left out: `mark_checkpoint` changes it alone."""
    salt = head[_HEAD.size - SALT_BYTES : _HEAD.size]
    return hashlib.blake2b(head[:8] + head[12:] + trailer, key=salt, digest_size=16).digest()


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of `data` or raise: a short write (a file size limit, a full disk) would
    leave the rest of the old bytes in place."""
    if os.pwrite(fd, data, offset) != len(data):
        raise OSError(errno.ENOSPC, "short write (the disk or the file size limit is full)")


_NOTHING: Final = Covered(
    dev=0, ino=0, offset=0, lines=0, size=0, mtime_ns=0, head_sha=bytes(32), tail_sha=bytes(32)
)


def mark_dirty(table: Table) -> None:
    """Before the first change: a crash from here on leaves an index nobody trusts. Only
    for the shared index, in its file."""
    assert table.path is not None and not table.in_memory
    _write_header(table._fd, state=DIRTY, slots=0, used=0, at=_NOTHING, trailer_len=0)
    os.fsync(table._fd)


def mark_checkpoint(table: Table) -> None:
    """A clean index that a run (holding the lock) is about to extend: from here on it is a
    checkpoint of the prefix it covered, so a run killed while extending it leaves an index
    the next run still extends, rather than one it must rebuild from the whole ledger."""
    assert table.path is not None and not table.in_memory
    _pwrite_all(table._fd, struct.pack("<I", CHECKPOINT), 8)  # the state field alone
    os.fsync(table._fd)


def finish(table: Table, at: Covered, trailer: dict[str, Any]) -> None:
    """After the ledger's fsync: write the trailer, then a clean header naming what the
    index now covers, and fsync. The header goes last: a crash before it leaves the index
    dirty, to be rebuilt. Only for the shared index, in its file."""
    _seal(table, at, trailer, CLEAN)


def checkpoint(table: Table, at: Covered, trailer: dict[str, Any]) -> None:
    """While a run goes on (every CHECKPOINT_S): a header saying that the table holds every
    record before `at.offset` (a ledger prefix already fsynced), with the trailer of that
    moment. A run killed later (`kill -9`) then costs the next one a read of the ledger
    from there on, not a rebuild from the whole ledger. `trailer` must be the state at
    `at.offset` as far as runs go (no run header after it): the caller sees to that."""
    _seal(table, at, trailer, CHECKPOINT)


def _seal(table: Table, at: Covered, trailer: dict[str, Any], state: int) -> None:
    assert table.path is not None and not table.in_memory
    fd = table._fd
    # Dirty while the trailer changes: a crash in between must not pair an older header
    # with a newer trailer.
    mark_dirty(table)
    table.flush()
    data = orjson.dumps(trailer)
    end = HEADER_BYTES + table.slots * SLOT_BYTES
    _pwrite_all(fd, data, end)
    os.ftruncate(fd, end + len(data))
    os.fsync(fd)  # the slots (through the mapping) and the trailer, before the header
    _write_header(
        fd,
        state=state,
        slots=table.slots,
        used=table.used,
        at=at,
        trailer_len=len(data),
        salt=table.salt,
        trailer=data,
    )
    os.fsync(fd)


def read_index(
    fd: int, ledger_fd: int, *, checkpoint_ok: bool = False
) -> tuple[int, int, Covered, dict[str, Any], bytes]:
    """(slots, used, covered, trailer, salt) of a clean index (or, with `checkpoint_ok`, a
    checkpoint: see CHECKPOINT) that describes a prefix of this ledger (same file, same
    first line, same bytes before the covered offset). Raises Stale otherwise."""
    raw = os.pread(fd, _HEAD.size + 16, 0)
    if len(raw) != _HEAD.size + 16:
        raise Stale("no header")
    raw, seal = raw[: _HEAD.size], raw[_HEAD.size :]
    (
        magic,
        state,
        _,
        slots,
        used,
        dev,
        ino,
        offset,
        lines,
        size,
        mtime_ns,
        trailer_len,
        head_sha,
        tail_sha,
        salt,
    ) = _HEAD.unpack(raw)
    if magic != MAGIC:
        raise Stale("another format or version")
    if state == CHECKPOINT and not checkpoint_ok:
        raise Stale("a run is using it, or was killed")
    if state not in (CLEAN, CHECKPOINT):
        raise Stale("a run stopped while it was updating it")
    if slots < MIN_SLOTS or slots & (slots - 1) or used > slots * MAX_LOAD:
        raise Stale("damaged header")
    if not 0 < trailer_len <= _MAX_TRAILER:
        raise Stale("damaged header")
    if os.fstat(fd).st_size != HEADER_BYTES + slots * SLOT_BYTES + trailer_len:
        raise Stale("the file has the wrong size")
    st = os.fstat(ledger_fd)
    if (dev, ino) != (st.st_dev, st.st_ino):
        raise Stale("made from another file")
    if st.st_size < offset or (st.st_size == size and st.st_mtime_ns != mtime_ns):
        raise Stale("the ledger was cut or rewritten since")
    if head_sha != _head_sha(ledger_fd) or tail_sha != _tail_sha(ledger_fd, offset):
        raise Stale("the ledger's bytes differ from the ones it was made from")
    if offset and os.pread(ledger_fd, 1, offset - 1) != b"\n":
        raise Stale("it ends inside a ledger line")
    data = os.pread(fd, trailer_len, HEADER_BYTES + slots * SLOT_BYTES)
    if _seal_of(raw, data) != seal:
        raise Stale("its header or trailer is not as it was written")
    try:
        trailer = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise Stale("damaged trailer") from None
    if not (
        isinstance(trailer, dict)
        and isinstance(trailer.get("codes"), list)
        and all(isinstance(c, str) for c in trailer["codes"])
        and isinstance(trailer.get("runs"), list)
        and isinstance(trailer.get("footers"), list)
        and isinstance(trailer.get("invalid"), list)
    ):
        raise Stale("damaged trailer")
    at = Covered(
        dev=dev,
        ino=ino,
        offset=offset,
        lines=lines,
        size=size,
        mtime_ns=mtime_ns,
        head_sha=head_sha,
        tail_sha=tail_sha,
    )
    if state == CHECKPOINT:
        # Slots taken after the checkpoint count too; and every slot must point at a record
        # the ledger still holds: one cut back, restored in place from a backup, or shorter
        # after a power cut than what was folded in is not described by this index.
        used, last = _used_and_last(fd, slots)
        if used > slots * MAX_LOAD or (used and last >= st.st_size):
            raise Stale("it holds records the ledger does not (cut, or restored from a backup)")
    return slots, used, at, trailer, salt


def _used_and_last(fd: int, slots: int) -> tuple[int, int]:
    """(slots whose key is not all zero, the largest record offset any slot holds), read
    in chunks as 8-byte words: 10 to a slot, the key in the first two, the offset the 8th."""
    per_slot = SLOT_BYTES // 8
    empty = last = 0
    per = 1 << 14
    for first in range(0, slots, per):
        n = min(per, slots - first)
        chunk = os.pread(fd, n * SLOT_BYTES, HEADER_BYTES + first * SLOT_BYTES)
        if len(chunk) != n * SLOT_BYTES:
            raise Stale("the file has the wrong size")
        words = memoryview(chunk).cast("Q")
        lows, highs = words[0::per_slot], words[1::per_slot]
        empty += list(map(operator.or_, lows, highs)).count(0)
        last = max(last, max(words[7::per_slot]))
    return slots - empty, last
