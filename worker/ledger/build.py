"""Building a new index table from a whole ledger at once (a rebuild): the slots are sorted
into regions of the table as the records are read, then each region is laid out in memory
and written with one call.

Why. Folded one record at a time (Table.put), every Name costs a read and a write of 80
bytes at a random place of a file the size of the table: two system calls and the Python
around them, ~5.4 µs a Name, most of a rebuild's time at 10^6 Names (measured). Here the
latest record per Name of a chunk of records is encoded (its key, its check) and appended
to the bucket of its region: the top bits of its key, which are the top bits of its home slot
(layout.home) whatever size the table turns out to need. Buckets go to an unlinked scratch
file beside the ledger as they fill (`SPILL_AT`: memory stays flat). At the end each bucket
is read back in record order, reduced to the latest slot per key, sorted by key and laid
out by linear probing in a buffer of its region; what runs past a region's end is carried
into the next one, and the last one's into the first, written last.

The table is the one Table.put would make: a Name's word is its latest record's; an
invalid line never hides what was sent for its Name (layout.INVALID_NO); every key sits at
the first free slot from its home on. The table is made big enough for the distinct Names
first (Table.reserve). A scratch file that cannot be made or written (a full disk) is no
failure: what was sorted so far, and the rest, go into the table one slot at a time.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Final

from worker.ledger.batch import take
from worker.ledger.layout import (
    INVALID_NO,
    MAX_LOAD,
    OUTCOME_AT,
    SLOT_BYTES,
    encode_slot,
    name_key,
    shift_for,
)
from worker.ledger.records import Item
from worker.ledger.state import State
from worker.ledger.table import Table

# A region is laid out in a buffer of this size (its bucket's distinct keys beside it).
REGION_BYTES: Final = 2 << 20
# Bucketed slots held in memory before they go to the scratch file.
SPILL_AT: Final = 8 << 20


# Called with each region's latest slot per key as it is laid out (premark.Joiner).
OnRegion = Callable[[int, dict[bytes, bytes]], None]


def regions_for(slots: int) -> int:
    """How many regions a bulk build of a table of `slots` sorts its slots into."""
    regions = 1
    while slots * SLOT_BYTES // (regions * 2) >= REGION_BYTES:
        regions *= 2
    return regions


class Bulk:
    """Intents and results of a whole ledger, read in order, on their way into `state`'s
    table (new, empty); `add` and `flush` as Batch's (batch.py), which extends a table that
    already holds something: `flush` at the end lays the table out."""

    def __init__(self, state: State, on_region: OnRegion | None = None) -> None:
        table = state.latest
        assert isinstance(table, Table) and table.used == 0
        self.state = state
        self.table = table
        self.pending: dict[str, tuple[Item, int]] = {}
        regions = regions_for(table.slots)
        self.region_shift = shift_for(regions)  # a key's region: its top log2(regions) bits
        self.on_region = on_region
        self.buckets = [bytearray() for _ in range(regions)]
        self.spilled: list[list[tuple[int, int]]] = [[] for _ in range(regions)]
        self.buffered = 0
        self.encoded = 0
        self._scratch = -1
        self._scratch_end = 0
        self.direct = False  # no scratch file: every slot straight into the table

    def add(self, item: Item, offset: int) -> None:
        """Take in one intent or result, read at byte `offset` of the ledger."""
        if take(self.state, self.pending, item, offset):
            self._encode()

    def _encode(self) -> None:
        """The pending records' slots, into their buckets."""
        table = self.table
        slots = [
            encode_slot(name_key(name), item, offset, table.code_of(item.code), table.salt)
            for name, (item, offset) in self.pending.items()
        ]
        self.pending.clear()
        self._bucket(slots)

    def _bucket(self, slots: list[bytes]) -> None:
        """Each slot into the bucket of its region, in order (or into the table)."""
        self.encoded += len(slots)
        if self.direct:
            for slot in slots:
                self.table.put_slot(slot, bulk=True)
            return
        buckets, shift = self.buckets, self.region_shift
        for slot in slots:
            buckets[int.from_bytes(slot[:8], "big") >> shift] += slot
        self.buffered += len(slots) * SLOT_BYTES
        if self.buffered >= SPILL_AT:
            self._spill()

    def _spill(self) -> None:
        """Every bucket's slots to the end of the scratch file (made on the first call)."""
        try:
            if self._scratch < 0:
                self._scratch = _scratch_file(self.table)
            for bucket, data in enumerate(self.buckets):
                if data:
                    _write_all(self._scratch, data, self._scratch_end)
                    self.spilled[bucket].append((self._scratch_end, len(data)))
                    self._scratch_end += len(data)
                    data.clear()
        except OSError:
            self._go_direct()
        self.buffered = 0

    def _go_direct(self) -> None:
        """No scratch file: what was sorted so far goes into the table a slot at a time (in
        record order per key: a bucket holds all of a key's slots), and so does the rest."""
        self.direct = True
        for bucket in range(len(self.buckets)):
            for data in self._bucket_data(bucket):
                for at in range(0, len(data), SLOT_BYTES):
                    self.table.put_slot(data[at : at + SLOT_BYTES], bulk=True)
            self.buckets[bucket].clear()
            self.spilled[bucket].clear()

    def flush(self) -> None:
        """Lay the table out (after the last `add`)."""
        self._encode()
        if self.direct:
            return
        table = self.table
        if self.encoded > table.slots * MAX_LOAD:  # maybe more Names than room: count them
            table.reserve(sum(len(self._latest_of(b)) for b in range(len(self.buckets))))
        self._lay_out()
        self.close()

    def _lay_out(self) -> None:
        table = self.table
        shift, regions = shift_for(table.slots), len(self.buckets)
        per = table.slots // regions
        carried: list[bytes] = []
        first = bytearray()
        used = 0
        for bucket in range(regions):
            latest = self._latest_of(bucket)
            if self.on_region is not None:
                self.on_region(bucket, latest)
            used += len(latest)
            region, carried = _region(per * bucket, per, shift, carried, latest)
            if bucket == 0:
                first = region  # written last: the last region's overflow wraps into it
            else:
                table.write_slots(per * bucket, region)
        table.write_slots(0, first)
        table.used = used - len(carried)
        for slot in carried:  # past the last region: from the first slot on, wherever free
            table.put_slot(slot, bulk=True)

    def _latest_of(self, bucket: int) -> dict[bytes, bytes]:
        """The bucket's latest slot per key (an invalid line's never over another)."""
        latest: dict[bytes, bytes] = {}
        for data in self._bucket_data(bucket):
            slots = [data[at : at + SLOT_BYTES] for at in range(0, len(data), SLOT_BYTES)]
            if INVALID_NO not in data[OUTCOME_AT::SLOT_BYTES]:  # the usual case: last wins
                latest.update([(slot[:16], slot) for slot in slots])
                continue
            for slot in slots:
                key = slot[:16]
                if slot[OUTCOME_AT] != INVALID_NO or key not in latest:
                    latest[key] = slot
        return latest

    def _bucket_data(self, bucket: int) -> Iterator[bytes]:
        """The bucket's slots in record order: the scratch file's pieces, then memory's."""
        for offset, length in self.spilled[bucket]:
            data = os.pread(self._scratch, length, offset)
            if len(data) != length:
                raise OSError(f"the scratch file is shorter than what was written ({offset})")
            yield data
        yield bytes(self.buckets[bucket])

    def close(self) -> None:
        """Let the scratch file go (it is unlinked: closing frees it). Idempotent."""
        fd, self._scratch = self._scratch, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def _region(
    first: int, size: int, shift: int, carried: list[bytes], latest: dict[bytes, bytes]
) -> tuple[bytearray, list[bytes]]:
    """The region of `size` slots from slot `first` on: `carried` (run over from the region
    before) from its start, then the slots of `latest` in key order, each at the first free
    slot from its home on (in key order: its home, or the one after the last placed); with
    the slots that run past its end."""
    pieces: list[bytes] = []
    out: list[bytes] = []
    last = -1  # the slot last filled
    placing = [(0, slot) for slot in carried]
    placing += [
        ((int.from_bytes(s[:8], "big") >> shift) - first, s) for s in sorted(latest.values())
    ]
    for home, slot in placing:
        at = max(home, last + 1)
        if at >= size:
            out.append(slot)
            continue
        if at > last + 1:
            pieces.append(bytes((at - last - 1) * SLOT_BYTES))  # the free slots between
        pieces.append(slot)
        last = at
    region = bytearray(b"".join(pieces))
    region += bytes(size * SLOT_BYTES - len(region))
    return region, out


def _scratch_file(table: Table) -> int:
    """An unlinked file beside the ledger (else in the temporary folder) for the buckets."""
    try:
        fd, name = tempfile.mkstemp(prefix=".worker-build-", dir=table.tmp_dir)
    except OSError:
        fd, name = tempfile.mkstemp(prefix=".worker-build-")
    os.unlink(name)
    return fd


def _write_all(fd: int, data: bytearray, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
