"""The index file's life: where it is, what it was made from (Covered), its header and
trailer, sealed clean at close or as a checkpoint while a run goes on, and `read_index`,
which believes one only when it describes a prefix of this very ledger. The table in it:
table.py; its layout: layout.py.

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

A cache never stops a run: see table.py.
"""

from __future__ import annotations

import errno
import hashlib
import operator
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from worker.ledger.layout import (
    CHECKPOINT,
    CLEAN,
    DIRTY,
    HEAD,
    HEADER_BYTES,
    MAGIC,
    MAX_LOAD,
    MIN_SLOTS,
    SALT_BYTES,
    SLOT_BYTES,
    Stale,
)
from worker.ledger.table import Table

TAIL_CHECK_BYTES: Final = 4096
_MAX_TRAILER: Final = 256 << 20


def index_path(ledger: Path) -> Path:
    real = Path(os.path.realpath(ledger))
    return real.with_name(real.name + ".index")


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
    data = HEAD.pack(
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
    salt = head[HEAD.size - SALT_BYTES : HEAD.size]
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


def seal(table: Table, at: Covered, trailer: dict[str, Any]) -> None:
    """`finish` for an index built in a file of its own (prebuild.py), before it has a
    name: the same trailer, then the same clean header."""
    _seal(table, at, trailer, CLEAN, shared=False)


def checkpoint(table: Table, at: Covered, trailer: dict[str, Any]) -> None:
    """While a run goes on (every CHECKPOINT_S): a header saying that the table holds every
    record before `at.offset` (a ledger prefix already fsynced), with the trailer of that
    moment. A run killed later (`kill -9`) then costs the next one a read of the ledger
    from there on, not a rebuild from the whole ledger. `trailer` must be the state at
    `at.offset` as far as runs go (no run header after it): the caller sees to that."""
    _seal(table, at, trailer, CHECKPOINT)


def _seal(
    table: Table, at: Covered, trailer: dict[str, Any], state: int, *, shared: bool = True
) -> None:
    assert (table.path is not None or not shared) and not table.in_memory
    fd = table._fd
    # Dirty while the trailer changes: a crash in between must not pair an older header
    # with a newer trailer.
    if shared:
        mark_dirty(table)
    else:
        _write_header(fd, state=DIRTY, slots=0, used=0, at=_NOTHING, trailer_len=0)
        os.fsync(fd)
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
    raw, seal = _read_header(fd)
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
    ) = HEAD.unpack(raw)
    if magic != MAGIC:
        raise Stale("another format or version")
    if state == CHECKPOINT and not checkpoint_ok:
        raise Stale("a run is using it, or was killed")
    if state not in (CLEAN, CHECKPOINT):
        raise Stale("a run stopped while it was updating it")
    _check_shape(fd, slots, used, trailer_len)
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
    ledger_size = _check_made_from(ledger_fd, at)
    trailer = _read_trailer(fd, raw, seal, HEADER_BYTES + slots * SLOT_BYTES, trailer_len)
    if state == CHECKPOINT:
        # Slots taken after the checkpoint count too; and every slot must point at a record
        # the ledger still holds: one cut back, restored in place from a backup, or shorter
        # after a power cut than what was folded in is not described by this index.
        used, last = _used_and_last(fd, slots)
        if used > slots * MAX_LOAD or (used and last >= ledger_size):
            raise Stale("it holds records the ledger does not (cut, or restored from a backup)")
    return slots, used, at, trailer, salt


def _read_header(fd: int) -> tuple[bytes, bytes]:
    """(the header's fields, packed; the seal after them)."""
    raw = os.pread(fd, HEAD.size + 16, 0)
    if len(raw) != HEAD.size + 16:
        raise Stale("no header")
    return raw[: HEAD.size], raw[HEAD.size :]


def _check_shape(fd: int, slots: int, used: int, trailer_len: int) -> None:
    """The header's sizes are possible, and the file is as long as they say."""
    if slots < MIN_SLOTS or slots & (slots - 1) or used > slots * MAX_LOAD:
        raise Stale("damaged header")
    if not 0 < trailer_len <= _MAX_TRAILER:
        raise Stale("damaged header")
    if os.fstat(fd).st_size != HEADER_BYTES + slots * SLOT_BYTES + trailer_len:
        raise Stale("the file has the wrong size")


def _check_made_from(ledger_fd: int, at: Covered) -> int:
    """The index was made from this ledger, and the prefix it covers is still there as it
    was; the ledger's size now."""
    st = os.fstat(ledger_fd)
    if (at.dev, at.ino) != (st.st_dev, st.st_ino):
        raise Stale("made from another file")
    if st.st_size < at.offset or (st.st_size == at.size and st.st_mtime_ns != at.mtime_ns):
        raise Stale("the ledger was cut or rewritten since")
    if at.head_sha != _head_sha(ledger_fd) or at.tail_sha != _tail_sha(ledger_fd, at.offset):
        raise Stale("the ledger's bytes differ from the ones it was made from")
    if at.offset and os.pread(ledger_fd, 1, at.offset - 1) != b"\n":
        raise Stale("it ends inside a ledger line")
    return st.st_size


def _read_trailer(fd: int, raw: bytes, seal: bytes, start: int, length: int) -> dict[str, Any]:
    """The trailer at `start`, once the seal shows header and trailer are as written."""
    data = os.pread(fd, length, start)
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
    return trailer


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
