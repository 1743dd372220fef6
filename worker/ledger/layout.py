"""The index file's layout (the index: table.py, index.py): a header of HEADER_BYTES, then
`slots` slots of SLOT_BYTES each, then the trailer (JSON: codes, run headers, footers, the
last run's invalid lines). The header names the format (MAGIC), the file's state, and what
the index was made from (index.Covered); a seal after its fields covers it and the trailer.

Slot: blake2b-128 of the Name (UTF-8), sha256 fingerprint (32 raw bytes), manifest line,
byte offset of the record that set it (to give the Name back for `items`), outcome, action,
flags, code (an index into the codes list), and a check: keyed blake2b-64 of the rest of
the slot, keyed with a random salt drawn for each table and kept in the header. Keys are
128-bit hashes, not Names: two distinct Names share a key with probability about n²/2¹²⁹,
≈ 1.5e-25 for ten million Names, far below the chance of a disk returning wrong bytes
undetected; that is the argument for not storing the Name (which would double the slot).

Where a key lives: its home slot is the top bits of its first 8 bytes (big-endian), then
the next free slot (linear probing). So the table is in key order, give or take a probe: a
bulk build (build.py) sorts records into contiguous regions by the same top bits whatever
size the table turns out to need, and a batch of lookups sorted by key reads the table
front to back.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Iterator
from typing import Any, Final

from worker.ledger.records import Action, Item, Latest, Outcome

MAGIC: Final = b"WKIDX\x00\x00\x03"  # the last byte is the format version (3: home())
HEAD = struct.Struct("<8sIIQQQQQQQQQ32s32s16s")  # see index._write_header
HEADER_BYTES: Final = 4096
# A slot: what it says (BODY), then its check (CHECK_BYTES, see table._check).
BODY = struct.Struct("<16s32sQQBBBxI")
BODY_BYTES: Final = BODY.size  # 72
_unpack_body: Final = BODY.unpack
CHECK_BYTES: Final = 8
SLOT_BYTES: Final = BODY_BYTES + CHECK_BYTES  # 80
SALT_BYTES: Final = 16
MIN_SLOTS: Final = 1 << 12
MAX_LOAD: Final = 0.6  # linear probing stays near 1.5 probes per lookup below this
# The header's state. DIRTY: being changed, trusted by nobody. CLEAN: describes the covered
# ledger prefix exactly. CHECKPOINT: holds every record of the covered prefix, and maybe
# some after it (a run went on writing): trusted only by a run holding the lock, which
# folds the ledger in again from the covered offset (folding a record twice is harmless:
# a Name's word is its latest record's) and counts the used slots afresh.
DIRTY: Final = 0
CLEAN: Final = 1
CHECKPOINT: Final = 2


# The header of a new table's file: nothing of it is on disk yet, so nobody trusts it.
DIRTY_HEADER: Final = HEAD.pack(
    MAGIC, DIRTY, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, bytes(32), bytes(32), bytes(SALT_BYTES)
).ljust(HEADER_BYTES, b"\0")


class Stale(Exception):
    """The index does not describe this ledger (or is damaged): rebuild it."""


_OUTCOMES: Final = (None, *Outcome)
_ACTIONS: Final = (None, *Action)
OUTCOME_NO: Final = {o: i for i, o in enumerate(_OUTCOMES)}
ACTION_NO: Final = {a: i for i, a in enumerate(_ACTIONS)}
_HAS_FP: Final = 1
OUTCOME_AT: Final = 64  # the outcome's byte in a slot
INVALID_NO: Final = OUTCOME_NO[Outcome.INVALID]
EMPTY_KEY: Final = bytes(16)  # an all-zero key marks an empty slot


class BadSlot(Exception):
    """A slot whose check fails: its bytes are not what this table wrote."""


def slot_check(salt: bytes, body: bytes) -> bytes:
    """The slot's check: keyed by the table's salt, so a slot copied from another table
    (another ledger's index, or an older index of this one) fails like an edited one."""
    check = _keyed(salt).copy()
    check.update(body)
    digest: bytes = check.digest()
    return digest


@functools.lru_cache(maxsize=16)
def _keyed(salt: bytes) -> Any:
    """blake2b keyed with `salt`, its key block already taken in: copied for each check,
    it costs 0.41 us a slot against 0.75 us keyed anew (measured), and a lookup checks one."""
    return hashlib.blake2b(key=salt, digest_size=CHECK_BYTES)


def encode_slot(key: bytes, item: Item, offset: int, code: int, salt: bytes) -> bytes:
    """The slot saying `item` (read at byte `offset` of the ledger; `code` its index in the
    codes list), with its check."""
    fp = bytes.fromhex(item.fingerprint) if item.fingerprint is not None else bytes(32)
    body = BODY.pack(
        key,
        fp,
        item.line,
        offset,
        OUTCOME_NO[item.outcome],
        ACTION_NO[item.action],
        _HAS_FP if item.fingerprint is not None else 0,
        code,
    )
    return body + slot_check(salt, body)


def decode_slot(buffer: Any, at: int, salt: bytes, codes: list[str]) -> Latest:
    """The slot at `at` of `buffer`; raises BadSlot when its check fails. (A lookup's hot
    path: its body is read once, checked, and unpacked from that copy.)"""
    body = buffer[at : at + BODY_BYTES]
    if type(body) is not bytes:  # a mapping's or a bytearray's slice: a copy of its own
        body = bytes(body)
    check = _keyed(salt).copy()
    check.update(body)
    if check.digest() != buffer[at + BODY_BYTES : at + SLOT_BYTES]:
        raise BadSlot
    _, fp, line, _, outcome, action, flags, code = _unpack_body(body)
    try:
        return Latest(
            _OUTCOMES[outcome], _ACTIONS[action], fp if flags & _HAS_FP else None, codes[code], line
        )
    except IndexError:
        raise BadSlot from None  # checked, yet not ours (an index of another build): not trusted


def name_key(name: str) -> bytes:
    key = hashlib.blake2b(name.encode(), digest_size=16).digest()
    return key if key != EMPTY_KEY else b"\x01" + key[1:]  # all-zero marks an empty slot


def shift_for(slots: int) -> int:
    """How far a key's first 8 bytes (big-endian) shift right to give its home slot in a
    table of `slots` (a power of two): `home(key, shift_for(slots))`."""
    return 65 - slots.bit_length()


def home(key: bytes, shift: int) -> int:
    """The slot where `key`'s probe starts (see the module docstring). Hot paths inline it."""
    return int.from_bytes(key[:8], "big") >> shift


def rehash_into(old: Any, slots: int, new: Any, new_slots: int, *, every: int) -> Iterator[None]:
    """Every used slot of the table of `slots` in `old` (a mapping of its file) into the
    empty table of `new_slots` in `new`, each from its home there on; yields every
    `every` slots (for the caller to drop resident pages)."""
    mask, shift = new_slots - 1, shift_for(new_slots)
    for i in range(slots):
        at = HEADER_BYTES + i * SLOT_BYTES
        slot = old[at : at + SLOT_BYTES]
        if i % every == 0:
            yield
        if slot[:16] == EMPTY_KEY:
            continue
        j = int.from_bytes(slot[:8], "big") >> shift
        while new[HEADER_BYTES + j * SLOT_BYTES : HEADER_BYTES + j * SLOT_BYTES + 16] != EMPTY_KEY:
            j = (j + 1) & mask
        new[HEADER_BYTES + j * SLOT_BYTES : HEADER_BYTES + (j + 1) * SLOT_BYTES] = slot


def slots_for(names: int) -> int:
    slots = MIN_SLOTS
    while names > slots * MAX_LOAD:
        slots <<= 1
    return slots
