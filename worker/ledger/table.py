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
import os
import struct
from collections.abc import Iterator, Mapping
from typing import Any

from worker.ledger.file import items_of, name_at
from worker.ledger.layout import (
    EMPTY_KEY,
    HEADER_BYTES,
    INVALID_NO,
    MAX_LOAD,
    OUTCOME_AT,
    SALT_BYTES,
    SLOT_BYTES,
    BadSlot,
    Stale,
    decode_slot,
    encode_slot,
    name_key,
)
from worker.ledger.probe import slot_in_file
from worker.ledger.records import Item, Latest
from worker.ledger.storage import DROP_EVERY, Storage, log, unavailable


class Table(Storage, Mapping[str, Latest]):
    """The hash table in a file (the shared index, or a private temporary one), or in
    anonymous memory when no file could hold it (`fd=None`).

    A Mapping from Name to Latest for plan.decide and report; `put` folds one intent or
    result into it. `items()` and iteration give Names back by reading the record each slot
    points at (only `report` without a manifest does that).

    Where its slots live (a file, or memory) and how it grows: storage.py."""

    def _find(self, key: bytes) -> int:
        """The offset of `key`'s slot, or of the empty slot where it would go."""
        mask = self.slots - 1
        i = int.from_bytes(key[:8], "big") >> (65 - self.slots.bit_length())  # layout.home
        mm = self._mm
        self._touches += 1
        if self._touches >= DROP_EVERY:
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

    def peek(self, name: str) -> Latest | None:
        """`get` without its repair: a slot that fails its check raises BadSlot (for a
        reader that must not rebuild the table: plan/ahead.py's helper)."""
        got: Latest | None = self._get(name, None)
        return got

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
        # Most keys sit at their home or the slot after it (at 10^6 Names 67 % and 24 %):
        # one read of both, looked at here (slot_in_file, a read more, only when the probe
        # goes on or wraps: the last slot's next is the first).
        home = int.from_bytes(key[:8], "big") >> (65 - self.slots.bit_length())
        pair = os.pread(self._fd, 2 * SLOT_BYTES, HEADER_BYTES + home * SLOT_BYTES)
        here = pair[:16]
        if here == key:
            return decode_slot(pair, 0, self.salt, self.codes)
        if here == EMPTY_KEY:
            return default
        if home + 1 < self.slots:
            here = pair[SLOT_BYTES : SLOT_BYTES + 16]
            if here == key:
                return decode_slot(pair, SLOT_BYTES, self.salt, self.codes)
            if here == EMPTY_KEY:
                return default
        _, pair = slot_in_file(self._fd, self.slots, key, self.path)
        return default if pair[:16] == EMPTY_KEY else decode_slot(pair, 0, self.salt, self.codes)

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
            if i % (DROP_EVERY * 16) == 0:
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
        of many in a row (a rebuild's tail), not one now and then (a run's own records)."""
        assert item.name is not None
        key = name_key(item.name)
        self.put_slot(encode_slot(key, item, offset, self.code_of(item.code), self.salt), bulk)

    def code_of(self, code: str) -> int:
        """`code`'s number in the codes list (the trailer's), added when new."""
        number = self._code_no.get(code)
        if number is None:
            number = self._code_no[code] = len(self.codes)
            self.codes.append(code)
        return number

    def put_slot(self, slot: bytes, bulk: bool = False) -> None:
        """Fold one encoded slot (layout.encode_slot, with this table's salt) in: it takes
        the place of its key's slot, or an empty one."""
        key = slot[:16]
        in_file = bulk and self._fd >= 0
        if in_file:
            # pread and pwrite, not the mapping: in bulk, faulting pages in and dropping
            # them again cost more than the two calls (a rebuild's writes 9.5 -> 6 us).
            at, here = slot_in_file(self._fd, self.slots, key, self.path)
            fresh = here[:16] == EMPTY_KEY
        else:
            at = self._find(key)
            fresh = self._mm[at : at + 16] == EMPTY_KEY
        if slot[OUTCOME_AT] == INVALID_NO and not fresh:
            # An invalid line never hides what was sent for its Name (a duplicate's valid
            # line holds the Name's state); it only says a Name known for nothing else
            # was invalid.
            return
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
                self._grow(self.slots * 2)

    def rebuild(self) -> None:
        """Fold the whole ledger again into a new table (a new salt), which takes this one's
        place: the shared index's file for a run holding the lock (left unmarked, so nobody
        trusts it until the run seals it), else a private file or memory. For a slot that
        failed its check: the index is derived, the ledger says what is true."""
        if self._ledger_fd is None:
            raise Stale("a slot failed its check, and there is no ledger to rebuild from")
        log.warning("ledger.index_rebuilt", index=str(self.path or "private"), reason="bad slot")
        shared = self.path if self._writable and not self.in_memory else None
        name: str | None
        try:
            name, fresh = self._new_file(self.slots, os.urandom(SALT_BYTES))
        except OSError as exc:
            unavailable(self.path or self.tmp_dir, exc, "memory")
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
