"""The ledger file itself: opened only when it is (or can be made) a regular file, and read
line by bounded line (`Reader`), forgiving only a torn last line. Nothing here writes.

* A file is a ledger only if its first line is our run header. Anything else (a config
  file, the manifest, a FIFO, a device, a directory) is refused untouched; a 0-byte file is
  adopted. A torn last line is cut (by `Ledger.open`) only after every line before it has
  parsed, and a lone first line only if it starts with the exact bytes our header starts
  with.
* Every line read is bounded (MAX_RECORD_BYTES); a longer one is damage, not data.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate, count
from pathlib import Path
from typing import IO, Any, Final

import orjson

from worker.errors import LedgerError
from worker.ledger.layout import Stale
from worker.ledger.records import Intent, Item, Record, Result
from worker.ledger.schema import item_of, parse

# The largest record we write is a result holding a 1 MiB manifest body and a bounded
# message; four times that leaves room and still bounds what one line can make us hold.
MAX_RECORD_BYTES: Final = 4 << 20
# orjson writes dataclass fields in order, so every header we write starts with these bytes.
# Only a lone unterminated first line that starts so is a torn header of ours.
_HEADER_PREFIX: Final = b'{"type":"run","run_id":"'


def open_regular(path: Path, *, write: bool) -> int | None:
    """An fd on `path` if it is (or, with `write`, can be created as) a regular file; None
    when it does not exist and `write` is off. A symbolic link is followed only to a regular
    file. O_NONBLOCK: opening a FIFO must not wait for a writer; the fstat after opening is
    the check that counts (the path may change between the stat and the open)."""
    flags = (
        (os.O_RDWR | os.O_APPEND if write else os.O_RDONLY)
        | os.O_NONBLOCK
        | os.O_NOCTTY
        | os.O_CLOEXEC
    )
    for _ in range(2):  # a second time only if the file appeared between stat and create
        create = 0
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if os.path.lexists(path):
                raise LedgerError(
                    f"{path}: is a symbolic link to {os.readlink(path)!r}, which "
                    "does not exist; a ledger must be a regular file"
                ) from None
            if not write:
                return None
            create = os.O_CREAT | os.O_EXCL  # O_EXCL: never through a link planted meanwhile
        except OSError as exc:
            raise LedgerError(f"{path}: cannot open the ledger: {exc.strerror}") from None
        else:
            _require_regular(path, st.st_mode)
        try:
            fd = os.open(path, flags | create, 0o644)
        except FileExistsError:
            continue
        except OSError as exc:
            what = "for writing" if write else "for reading"
            raise LedgerError(f"{path}: cannot open the ledger {what}: {exc.strerror}") from None
        try:
            _require_regular(path, os.fstat(fd).st_mode)
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise LedgerError(f"{path}: the file kept changing while the ledger was opened")


def _require_regular(path: Path, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = (
        "a directory"
        if stat.S_ISDIR(mode)
        else "a FIFO (named pipe)"
        if stat.S_ISFIFO(mode)
        else "a character device"
        if stat.S_ISCHR(mode)
        else "a block device"
        if stat.S_ISBLK(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "not a regular file"
    )
    raise LedgerError(f"{path}: is {kind}; a ledger must be a regular file (nothing was changed)")


def check_same_file(path: Path, fd: int) -> None:
    """After locking: the path must still name the file we opened, or we would hold the
    path's lock while writing a file that was moved away."""
    try:
        now = os.stat(path)
    except OSError:
        now = None
    held = os.fstat(fd)
    if now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
        raise LedgerError(
            f"{path}: was moved or replaced while it was being opened; "
            "nothing was changed, run again"
        )


def close_quietly(*fds: int | None) -> None:
    """Close each descriptor that is open (not None, not negative), ignoring errors: for
    clean-up paths, where a failed close has nobody to tell."""
    for fd in fds:
        if fd is not None and fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


# -- reading ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Lines:
    """Whole ledger lines as read (without their newlines): the first one's line number,
    and each one's byte offset, then the offset after the last."""

    first: int
    offsets: list[int]
    lines: list[bytes]


class Reader:
    """Decoded ledger lines, line by bounded line, from byte `start` (line `lineno` + 1 is
    the first read). After iterating, `torn_at` is the offset of a torn last line (None if
    there was none), `end` the offset after the last whole line, `lineno` the lines read;
    the reader never writes."""

    def __init__(self, path: Path, f: IO[bytes], *, start: int = 0, lineno: int = 0) -> None:
        self.path = path
        self.f = f
        self.torn_at: int | None = None
        self.end = start
        self.lineno = lineno

    def __iter__(self) -> Iterator[Record]:
        for _, lineno, obj in self.objects():
            yield parse(obj, where=self.where(lineno))

    def where(self, lineno: int) -> str:
        """FILE:LINE, for messages (made only when needed: most lines never need it)."""
        return f"{self.path}:{lineno}"

    def objects(self) -> Iterator[tuple[int, int, Any]]:
        """(offset, line number, decoded object) per whole line."""
        for lines in self.chunks():
            yield from self.decoded(lines)

    def chunks(self) -> Iterator[Lines]:
        """The whole lines, a chunk at a time as read, not yet decoded (a rebuild decodes
        a chunk in one go: build.py); `decoded` for the checks each line must pass."""
        self.f.seek(self.end)  # descriptors dup'ed from one open file share its offset
        offset, lineno, pending = self.end, self.lineno, b""
        while chunk := self._read():
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()  # what follows the chunk's last newline
            if lines:
                lengths = list(map(len, lines))
                if max(lengths) > MAX_RECORD_BYTES:
                    too_long = next(i for i, n in enumerate(lengths) if n > MAX_RECORD_BYTES)
                    raise self._too_long(lineno + 1 + too_long)
                offsets = list(accumulate(map((1).__add__, lengths), initial=offset))
                yield Lines(first=lineno + 1, offsets=offsets, lines=lines)
                offset, lineno = offsets[-1], lineno + len(lines)
                self.end, self.lineno = offset, lineno
            if len(pending) > MAX_RECORD_BYTES:
                raise self._too_long(lineno + 1)
        if pending:  # the end of the file, inside a record: a crash
            if lineno == 0 and not pending.startswith(_HEADER_PREFIX):
                raise self._foreign()
            self.torn_at = offset

    def decoded(self, lines: Lines) -> Iterator[tuple[int, int, Any]]:
        """(offset, line number, decoded object) per line of `lines`: each one JSON, and
        the file's first one our run header."""
        decode = self.decode
        for lineno, offset, raw in zip(count(lines.first), lines.offsets, lines.lines):
            yield offset, lineno, decode(raw, lineno)

    def decode(self, raw: bytes, lineno: int) -> Any:
        """Line `lineno`, decoded: JSON, and the file's first one our run header."""
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
        if lineno == 1 and not (isinstance(obj, dict) and obj.get("type") == "run"):
            raise self._foreign()
        if obj is None:
            raise LedgerError(
                f"{self.path}:{lineno}: damaged ledger record: the line is not JSON; "
                "fix that line and run again (keep the ledger: it is the history of "
                "what was sent)"
            )
        return obj

    def _read(self) -> bytes:
        try:
            return self.f.read(_CHUNK)
        except OSError as exc:
            raise LedgerError(f"{self.path}: cannot read the ledger: {exc.strerror}") from None

    def _too_long(self, lineno: int) -> LedgerError:
        if lineno == 1:
            return self._foreign()
        return LedgerError(
            f"{self.path}:{lineno}: damaged ledger record: the line is longer "
            f"than {MAX_RECORD_BYTES} bytes"
        )

    def _foreign(self) -> LedgerError:
        return LedgerError(
            f"{self.path}: is not a worker ledger (its first line is not a "
            "run header); nothing was changed. Check --ledger"
        )


def items_of(ledger_fd: int) -> Iterator[tuple[Item, int]]:
    """(item, its offset) for every whole intent or result line of the ledger, in order.
    The ledger was read whole when it was opened: a line that does not parse now is skipped
    here (it is the ledger's reader that says what is damage)."""
    offset, pending = 0, b""
    while True:
        chunk = os.pread(ledger_fd, _CHUNK, offset + len(pending))
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


_CHUNK: Final = 1 << 20


def name_at(ledger_fd: int, offset: int) -> str:
    """The Name of the record at byte `offset` of the ledger (the table keeps only keys)."""
    raw = os.pread(ledger_fd, 1 << 16, offset)
    while b"\n" not in raw and len(raw) < (8 << 20):  # a record holding a big body
        more = os.pread(ledger_fd, 1 << 20, offset + len(raw))
        if not more:
            break
        raw += more
    name = orjson.loads(raw.partition(b"\n")[0]).get("name")
    if not isinstance(name, str):
        raise Stale(f"the record at byte {offset} holds no Name")
    return name
