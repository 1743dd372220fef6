"""Finding a Name's slot in an index file with `pread` (the table's layout: layout.py).

Reads, not the mapping: a slot read so adds nothing to our resident set, so no pages need
dropping (dropping pages and faulting them back in cost twice as much, measured).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Final

from worker.ledger.layout import EMPTY_KEY, HEADER_BYTES, SLOT_BYTES

# Slots read at a time: linear probing rarely needs more than two below MAX_LOAD.
_PROBE_SLOTS: Final = 2


def slot_in_file(fd: int, slots: int, key: bytes, where: Path | None) -> tuple[int, bytes]:
    """(the file offset of `key`'s slot, or of the empty slot where it would go; that
    slot's bytes) in the table of `slots` slots in `fd`; `where` is its path (None: a
    private file), for errors."""
    mask = slots - 1
    i = int.from_bytes(key[:8], "big") >> (65 - slots.bit_length())  # layout.home, inlined
    while True:
        run = min(_PROBE_SLOTS, slots - i)
        start = HEADER_BYTES + i * SLOT_BYTES
        chunk = os.pread(fd, run * SLOT_BYTES, start)
        for at in range(0, len(chunk), SLOT_BYTES):
            if chunk[at : at + 16] in (key, EMPTY_KEY):
                return start + at, chunk[at : at + SLOT_BYTES]
        if len(chunk) < run * SLOT_BYTES:
            raise OSError(errno.EIO, f"{where or 'the index'} is shorter than its table")
        i = (i + run) & mask
