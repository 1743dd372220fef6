"""The ledger's per-Name state, kept on disk: `<ledger>.index`, derived from the ledger.

Why on disk. A run needs, per Name, the ledger's latest word (outcome, action, fingerprint,
code, line). As Python objects that was ~300 B per Name (3 GB for ten million); even packed
into arrays it is ~60 B (the fingerprint alone is 32) plus the table's slack, which does not
fit ten million Names in 200 MB. Measured alternatives: sqlite3 point lookups cost ~12 µs
each from Python (a resume looks every manifest line up, twice), a sorted file needs ~23
probes per lookup. So the index is an open-addressing hash table of fixed 72-byte slots in a
file, read through `mmap` (a lookup is one hash and one or two `unpack_from`s, ~1.5 µs),
whose pages are dropped from our resident set every few thousand touches (MADV_DONTNEED on a
shared file mapping only unmaps them: the page cache keeps them, dirty ones included).

Slot: blake2b-128 of the Name (UTF-8), sha256 fingerprint (32 raw bytes), manifest line,
byte offset of the record that set it (to give the Name back for `items`), outcome, action,
flags, code (an index into the codes list). Keys are 128-bit hashes, not Names: two distinct
Names share a key with probability about n²/2¹²⁹, ≈ 1.5e-25 for ten million Names, far below
the chance of a disk returning wrong bytes undetected; that is the argument for not storing
the Name (which would double the slot).

Derived, never trusted over the ledger. The header records what the index was made from:
the ledger's device and inode, the byte offset and line count it covers, the ledger's size
and mtime when it was last brought up to date, sha256 of the ledger's first line (its first
run header: a random run id, so another ledger never matches) and of the 4 KiB before the
covered offset. The index is used only when all of them match and it is marked clean; a
ledger that grew (a run appended to it) is read from the covered offset on and folded in;
on any other mismatch, damage, a dirty mark (a run that was killed while it updated the
index) or another version, it is rebuilt from the whole ledger. A hand edit inside the
ledger that keeps its size and is followed by an append is not noticed (the ledger is
append-only by contract; the 4 KiB before the covered offset are checked).

Who writes it. Only a process holding the ledger's lock (`Ledger.open`): it marks the index
dirty (fsynced) before the first change, folds what the run appends into it, and at close,
after the ledger's fsync, writes the trailer (codes, run headers, footers, the last run's
invalid lines) and a clean header. A reader without the lock (`read_state`: dry runs,
`report`) uses the index only if it is clean and covers the ledger exactly; otherwise it
builds a private one in an unlinked temporary file beside the ledger.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from worker.records import DONE, Action, Intent, Item, Outcome, Result

MAGIC: Final = b"WKIDX\x00\x00\x01"  # the last byte is the format version
_HEAD = struct.Struct("<8sIIQQQQQQQQQ32s32s")  # see _Header.pack
HEADER_BYTES: Final = 4096
_SLOT = struct.Struct("<16s32sQQBBBxI")
SLOT_BYTES: Final = _SLOT.size  # 72
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


class Stale(Exception):
    """The index does not describe this ledger (or is damaged): rebuild it."""


def index_path(ledger: Path) -> Path:
    real = Path(os.path.realpath(ledger))
    return real.with_name(real.name + ".index")


def name_key(name: str) -> bytes:
    key = hashlib.blake2b(name.encode(), digest_size=16).digest()
    return key if key != _EMPTY_KEY else b"\x01" + key[1:]  # all-zero marks an empty slot


def slots_for(names: int) -> int:
    slots = MIN_SLOTS
    while names > slots * MAX_LOAD:
        slots <<= 1
    return slots


@dataclass(slots=True)
class Latest:
    """The ledger's latest word on one Name (what plan.decide and report read)."""

    outcome: Outcome | None  # None: an intent with no result after it (in doubt)
    action: Action | None
    fp: bytes | None  # sha256 digest of the body sent; None for deletes and nameless lines
    code: str  # the last answer's error code, "" for success or in doubt
    line: int

    @classmethod
    def of(cls, record: Intent | Result) -> Latest:
        item = Item.of(record)
        fp = bytes.fromhex(item.fingerprint) if item.fingerprint is not None else None
        return cls(outcome=item.outcome, action=item.action, fp=fp, code=item.code, line=item.line)

    @property
    def in_doubt(self) -> bool:
        """Sent, and no answer recorded: the next run sends it again."""
        return self.outcome is None

    @property
    def done(self) -> bool:
        return self.outcome in DONE

    @property
    def fingerprint(self) -> str | None:
        return self.fp.hex() if self.fp is not None else None


class Table(Mapping[str, Latest]):
    """The hash table in a file (the shared index, or a private temporary one).

    A Mapping from Name to Latest for plan.decide and report; `put` folds one intent or
    result into it. `items()` and iteration give Names back by reading the record each slot
    points at (only `report` without a manifest does that)."""

    def __init__(
        self,
        fd: int,
        *,
        slots: int,
        used: int,
        codes: list[str],
        ledger_fd: int | None,
        writable: bool,
        tmp_dir: str,
        path: Path | None = None,
    ) -> None:
        self.path = path  # the shared index's path; None for a private one
        self._fd = fd
        self._tmp_dir = tmp_dir
        self.slots = slots
        self.used = used
        self.codes = codes
        self._code_no = {c: i for i, c in enumerate(codes)}
        self._ledger_fd = ledger_fd
        self._writable = writable
        self._mm = self._map(slots)
        self._touches = 0

    def _map(self, slots: int) -> mmap.mmap:
        size = HEADER_BYTES + slots * SLOT_BYTES
        if self._writable:
            # Blocks are reserved, not left sparse: a store into a mapped hole on a full
            # disk is a SIGBUS; this way a full disk is an OSError here instead.
            os.posix_fallocate(self._fd, 0, size)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if self._writable else 0)
        mm = mmap.mmap(self._fd, size, flags=mmap.MAP_SHARED, prot=prot)
        mm.madvise(mmap.MADV_RANDOM)
        return mm

    # -- reading ---------------------------------------------------------------------

    def _find(self, key: bytes) -> int:
        """The offset of `key`'s slot, or of the empty slot where it would go."""
        mask = self.slots - 1
        i = int.from_bytes(key[8:], "little") & mask
        mm = self._mm
        self._touches += 1
        if self._touches >= _DROP_EVERY:
            self._touches = 0
            mm.madvise(mmap.MADV_DONTNEED)
        while True:
            at = HEADER_BYTES + i * SLOT_BYTES
            here = mm[at : at + 16]
            if here in (key, _EMPTY_KEY):
                return at
            i = (i + 1) & mask

    def _entry(self, at: int) -> Latest:
        _, fp, line, _, outcome, action, flags, code = _SLOT.unpack_from(self._mm, at)
        return Latest(
            _OUTCOMES[outcome],
            _ACTIONS[action],
            fp if flags & _HAS_FP else None,
            self.codes[code],
            line,
        )

    def __getitem__(self, name: str) -> Latest:
        at = self._find(name_key(name))
        if self._mm[at : at + 16] == _EMPTY_KEY:
            raise KeyError(name)
        return self._entry(at)

    def get(self, name: str, default: Any = None) -> Any:  # the hot path: one probe
        at = self._find(name_key(name))
        if self._mm[at : at + 16] == _EMPTY_KEY:
            return default
        return self._entry(at)

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
                mm.madvise(mmap.MADV_DONTNEED)

    def values(self) -> Iterator[Latest]:  # type: ignore[override]
        for at in self._used_slots():
            yield self._entry(at)

    def __iter__(self) -> Iterator[str]:
        for name, _ in self.items():
            yield name

    def items(self) -> Iterator[tuple[str, Latest]]:  # type: ignore[override]
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
        _SLOT.pack_into(
            self._mm,
            at,
            key,
            fp,
            item.line,
            offset,
            _OUTCOME_NO[item.outcome],
            _ACTION_NO[item.action],
            _HAS_FP if item.fingerprint is not None else 0,
            code,
        )
        if fresh:
            self.used += 1
            if self.used > self.slots * MAX_LOAD:
                self._grow()

    def _grow(self) -> None:
        """Double the table into a new file, then put it in the old one's place (a rename:
        anyone still mapping the old file keeps reading it, and nothing is ever cut from
        under a mapping, which would be a SIGBUS)."""
        fd, name = tempfile.mkstemp(prefix=".worker-index-", dir=self._tmp_dir)
        try:
            bigger = Table(
                fd,
                slots=self.slots * 2,
                used=0,
                codes=self.codes,
                ledger_fd=None,
                writable=True,
                tmp_dir=self._tmp_dir,
            )
            mask, new = bigger.slots - 1, bigger._mm
            old = self._mm
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
                    old.madvise(mmap.MADV_DONTNEED)
                    new.madvise(mmap.MADV_DONTNEED)
            new[:HEADER_BYTES] = old[:HEADER_BYTES]  # the dirty mark
            if self.path is not None:
                os.replace(name, self.path)
            else:
                os.unlink(name)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise
        old.close()
        os.close(self._fd)
        self._fd, self._mm, self.slots = fd, new, bigger.slots
        bigger._fd = -1  # its descriptor and mapping are ours now
        bigger._mm = mmap.mmap(-1, 1)

    def flush(self) -> None:
        if self._writable:
            self._mm.flush()

    def close(self) -> None:
        """Unmap and close the file. Idempotent."""
        if not self._mm.closed:
            self._mm.close()
        for fd in (self._fd, self._ledger_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._fd, self._ledger_fd = -1, None

    def __del__(self) -> None:
        self.close()


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
    fd: int, *, clean: bool, slots: int, used: int, at: Covered, trailer_len: int
) -> None:
    data = _HEAD.pack(
        MAGIC,
        int(clean),
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
    )
    os.pwrite(fd, data, 0)


_NOTHING: Final = Covered(
    dev=0, ino=0, offset=0, lines=0, size=0, mtime_ns=0, head_sha=bytes(32), tail_sha=bytes(32)
)


def mark_dirty(table: Table) -> None:
    """Before the first change: a crash from here on leaves an index nobody trusts."""
    _write_header(table._fd, clean=False, slots=0, used=0, at=_NOTHING, trailer_len=0)
    os.fsync(table._fd)


def finish(table: Table, at: Covered, trailer: dict[str, Any]) -> None:
    """After the ledger's fsync: write the trailer, then a clean header naming what the
    index now covers, and fsync. The header goes last: a crash before it leaves the index
    dirty, to be rebuilt."""
    table.flush()
    data = orjson.dumps(trailer)
    end = HEADER_BYTES + table.slots * SLOT_BYTES
    os.pwrite(table._fd, data, end)
    os.ftruncate(table._fd, end + len(data))
    os.fsync(table._fd)
    _write_header(
        table._fd, clean=True, slots=table.slots, used=table.used, at=at, trailer_len=len(data)
    )
    os.fsync(table._fd)


def read_index(fd: int, ledger_fd: int) -> tuple[int, int, Covered, dict[str, Any]]:
    """(slots, used, covered, trailer) of a clean index that describes a prefix of this
    ledger (same file, same first line, same bytes before the covered offset). Raises Stale
    otherwise."""
    raw = os.pread(fd, _HEAD.size, 0)
    if len(raw) != _HEAD.size:
        raise Stale("no header")
    (
        magic,
        clean,
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
    ) = _HEAD.unpack(raw)
    if magic != MAGIC:
        raise Stale("another format or version")
    if not clean:
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
    try:
        trailer = orjson.loads(os.pread(fd, trailer_len, HEADER_BYTES + slots * SLOT_BYTES))
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
    return slots, used, at, trailer
