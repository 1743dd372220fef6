"""The manifest's lines that the ledger records as done, marked by the prebuild's child
(prebuild.py) as it lays its new table out: a join, not a lookup per line.

Why. An all-done rerun with nothing remembered waited for the rebuild (~9.5 s of one core at
10^6 lines) while the run itself, its manifest validated after ~5 s, idled; then its plan
looked every line up in the new index (~3.6 µs a line, ~3 s with its helper). But the child
holds, region by region, the latest slot of every key in memory just before it writes the
region out (build.Bulk), and the run has nothing to do meanwhile. So the run, idle, hashes
its manifest's Names and buckets them (key, fingerprint, item number) by the same top bits
of the key as the child buckets its slots, into a scratch file both share (`offer`); the
child, laying each region out, marks every line whose Name's latest slot says done with the
line's very fingerprint (`Joiner`: a dict lookup and a compare, ~0.5 µs a line), in memory
both share. The plan skips a marked line without a lookup (commands/run.py).

Why a mark is true. It is exactly run_plan.decide_on's "done" (the outcome is one the
account holds, the slot has a fingerprint, and it is the line's), said of the latest slot
per key of the whole ledger as the child read it. The run believes the marks only when the
child built its index and the ledger, under the run's lock, ends where the child stopped
reading (`Board.believed`): then the run's state is what the child folded. From then on a
mark stays true as the look-ahead's does (plan/ahead.py): until the plan reaches a line this
run writes only records of lines before it.

When not: the run still validating when the child lays out (the child does not wait, and
says so: the run then offers nothing), a manifest below MIN_LINES lines or read from a pipe,
a run that cannot read its spool or write the scratch file (it gives up and the child lays
out alone). A line not marked is looked up as always.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import orjson

from worker.ledger.file import close_quietly
from worker.ledger.layout import OUTCOME_AT, name_key

# Below this many manifest lines the plan's lookups cost less than hashing the Names twice.
MIN_LINES = 100_000  # not Final: the tests lower it
# How long the child waits for the run to start offering when it is ready to join: not at
# all (a run still validating is no faster for a child waiting on it). Not Final: the tests
# raise it, for a child that reaches its join before a short manifest is validated.
PATIENCE_S = 0.0
# A manifest line in the scratch file: its Name's key, its fingerprint, its item number.
ENTRY: Final = struct.Struct("<16s32sI")
_FLAGS_AT: Final = OUTCOME_AT + 2  # the slot's flags byte (layout.BODY)
_HAS_FP: Final = 1
_SPILL_AT: Final = 4 << 20
_ASK_EVERY: Final = 1 << 16  # entries between two looks at whether the child still wants them
# The status bytes: the child's covered end (8 bytes), whether it wrote it, and the join's.
_END_SET: Final = 8
_JOIN: Final = 9
WAITING, JOINING, SKIPPED = 0, 1, 2
_STARTED: Final = b"S"
_READY: Final = struct.Struct("<QQ")  # where the bucket directory lies in the scratch file


@dataclass(slots=True)
class Board:
    """What the run and the child share, made before the fork: the marks (a byte per spool
    item), the status bytes, the scratch file, the pipe that says the entries are there."""

    marks: mmap.mmap
    status: mmap.mmap
    scratch: int
    read_fd: int
    write_fd: int
    shift: int  # a key's bucket: its first 8 bytes (big-endian) >> shift
    buckets: int
    done_outcomes: bytes  # layout.OUTCOME_NO of each outcome that counts as done

    def close(self) -> None:
        """Let everything go (the parent's, after the plan; the child's dies with it)."""
        close_quietly(self.scratch, self.read_fd, self.write_fd)
        self.scratch = self.read_fd = self.write_fd = -1
        for shared in (self.marks, self.status):
            with contextlib.suppress(BufferError, ValueError):
                shared.close()

    def covered(self, end: int) -> None:
        """The child's: its index covers the ledger up to byte `end`."""
        struct.pack_into("<Q", self.status, 0, end)
        self.status[_END_SET] = 1

    def believed(self, ledger_size: int) -> bool:
        """The run's, holding the lock, once the child built its index: whether the marks
        describe this ledger (it ends where the child stopped reading)."""
        if not self.status[_END_SET]:
            return False
        return bool(struct.unpack_from("<Q", self.status, 0)[0] == ledger_size)


def board(lines: int, scratch_dir: str, shift: int, buckets: int, done: bytes) -> Board | None:
    """A board for a manifest of `lines` lines (the parent's, before the fork), or None."""
    if lines < MIN_LINES or not done:
        return None
    try:
        scratch = os.open(scratch_dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    try:
        read_fd, write_fd = os.pipe()
    except OSError:
        os.close(scratch)
        return None
    try:  # shared and anonymous: zero, "not known"
        marks, status = mmap.mmap(-1, lines), mmap.mmap(-1, 16)
    except OSError:  # no memory for them: the plan looks every line up, as before
        close_quietly(scratch, read_fd, write_fd)
        return None
    return Board(
        marks=marks,
        status=status,
        scratch=scratch,
        read_fd=read_fd,
        write_fd=write_fd,
        shift=shift,
        buckets=buckets,
        done_outcomes=done,
    )


def offer(b: Board, entries: Iterable[tuple[int, str, str]]) -> bool:
    """The run's, after validating: each valid item (number, Name, fingerprint) into the
    scratch file, bucketed, and the child told where. False when the child no longer
    wants them (it laid out already, or gave up on them) or anything failed."""
    if b.status[_JOIN] != WAITING:
        return False
    fd, b.write_fd = b.write_fd, -1
    try:
        os.write(fd, _STARTED)
        pieces = _write_buckets(b, entries)
        if pieces is None:
            return False
        directory = orjson.dumps(pieces)
        at = os.fstat(b.scratch).st_size
        if os.pwrite(b.scratch, directory, at) != len(directory):
            return False
        os.write(fd, _READY.pack(at, len(directory)))
        return True
    except (OSError, ValueError):
        return False
    finally:
        close_quietly(fd)  # the child reads an end here, whatever happened


def _write_buckets(b: Board, entries: Iterable[tuple[int, str, str]]) -> list[list[int]] | None:
    """The entries into the scratch file; per bucket its pieces as [offset, length, ...]."""
    buckets = [bytearray() for _ in range(b.buckets)]
    pieces: list[list[int]] = [[] for _ in range(b.buckets)]
    pack, shift, lines, status = ENTRY.pack, b.shift, len(b.marks), b.status
    buffered = end = 0
    for n, (k, name, fingerprint) in enumerate(entries):
        if n % _ASK_EVERY == 0 and status[_JOIN] == SKIPPED:
            return None
        fp = bytes.fromhex(fingerprint)
        if k >= lines or len(fp) != 32 or fp.hex() != fingerprint:
            continue  # not comparable as decide_on compares it: looked up as always
        key = name_key(name)
        buckets[int.from_bytes(key[:8], "big") >> shift] += pack(key, fp, k)
        buffered += ENTRY.size
        if buffered >= _SPILL_AT:
            end = _spill(b.scratch, buckets, pieces, end)
            buffered = 0
    _spill(b.scratch, buckets, pieces, end)
    return pieces


def _spill(fd: int, buckets: list[bytearray], pieces: list[list[int]], end: int) -> int:
    for bucket, data in enumerate(buckets):
        if data:
            if os.pwrite(fd, data, end) != len(data):
                raise OSError("a short write to the scratch file")
            pieces[bucket] += (end, len(data))
            end += len(data)
            data.clear()
    return end


class Joiner:
    """The child's: called with each region's latest slot per key as the table is laid out
    (build.Bulk), it marks the run's lines that slot says are done."""

    def __init__(self, b: Board) -> None:
        self.board = b
        self.pieces: list[list[int]] | None = None
        self.asked = False

    def __call__(self, bucket: int, latest: dict[bytes, bytes]) -> None:
        if not self.asked:
            self.asked = True
            self.pieces = self._receive()
        if self.pieces is None or bucket >= len(self.pieces):
            return
        b, get, marks = self.board, latest.get, self.board.marks
        done, piece = b.done_outcomes, self.pieces[bucket]
        for at in range(0, len(piece), 2):
            data = os.pread(b.scratch, piece[at + 1], piece[at])
            if len(data) != piece[at + 1]:
                raise OSError("the scratch file is shorter than what was written")
            for key, fp, k in ENTRY.iter_unpack(data):
                slot = get(key)
                if (
                    slot is not None
                    and slot[16:48] == fp
                    and slot[OUTCOME_AT] in done
                    and slot[_FLAGS_AT] & _HAS_FP
                ):
                    marks[k] = 1

    def _receive(self) -> list[list[int]] | None:
        """The bucket directory, if the run is offering it (then it is waited for: the run
        does nothing else meanwhile); else None, and the run told not to start."""
        b = self.board
        readable, _, _ = select.select([b.read_fd], [], [], PATIENCE_S)
        started = os.read(b.read_fd, 1) if readable else b""
        if started != _STARTED:
            b.status[_JOIN] = SKIPPED
            return None
        b.status[_JOIN] = JOINING
        ready = b""
        while len(ready) < _READY.size and (more := os.read(b.read_fd, _READY.size - len(ready))):
            ready += more
        if len(ready) != _READY.size:
            return None  # the run gave up (or is gone)
        at, length = _READY.unpack(ready)
        pieces = orjson.loads(os.pread(b.scratch, length, at))
        if not isinstance(pieces, list) or len(pieces) != b.buckets:
            return None
        return pieces

    def finish(self) -> None:
        """The child ends (or gives up): a run still waiting to offer need not."""
        if self.board.status[_JOIN] == WAITING:
            self.board.status[_JOIN] = SKIPPED
