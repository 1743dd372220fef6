"""Manifest step: read a JSONL manifest once into validated groups, or problems naming
file:line:field.

`scan` reads the source exactly once, in bounded lines: it validates every line (before
anything is sent), hashes the bytes for the ledger header, and writes each line's verdict to
a private spool file: the canonical body of a valid line, the problem of an invalid one.
`read` streams that spool, never the source, so every body sent is one that was validated,
made from the bytes that were hashed: a pipe (`run <(gen)`, `cat m | run /dev/stdin`) works,
and a source appended to or edited in place after `scan` has no effect. `read` may be called
any number of times (to plan, then to send); each call is an independent pass that parses
no JSON.

Memory stays flat: lines are streamed, verdicts are on disk. Only the duplicate check grows
with the manifest, by 6 to 11 bytes per Name (`_Seen`): 32 bits of a hash per Name in
open-addressing `array('I')` tables, not a dict (which cost ~194 B per line). A hash seen
before only makes a line a suspect; the suspects are settled after the pass by one read of
the spool that compares the Names themselves, so a hash collision never reports a duplicate,
and the message still names the first line.

The spool lives on a real disk (the ledger's folder), which may be full, read-only or
failing. Every failure of the spool while scanning (create, write, flush, read back) is a
ManifestError naming the manifest, the spool's folder and the reason: nothing was sent
yet. A failure to read it back later, while `read` feeds a run, is a SpoolError (a
LedgerWriteError: the run stops, exit 7 once requests went out). Closing it never fails:
it is an unlinked scratch copy, and nothing in it is still needed then.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import heapq
import io
import json
import os
import stat
import tempfile
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self

import orjson

from worker import __version__, line_names
from worker.api import spec
from worker.errors import ManifestError, Problem, SpoolError

MAX_LINE_BYTES = 1 << 20  # a group body is tiny; a longer line is a mistake, not data
# An over-long line is skipped to its end so the lines after it keep their numbers; past this
# it is not a manifest at all (a binary file, a device such as /dev/zero) and we stop.
MAX_SKIPPED_LINE_BYTES = 64 << 20
# The whole source. Ten million groups are about 2 GB; a source past this is a mistake or a
# device that never ends (/dev/zero, /dev/urandom), and we stop reading it.
MAX_MANIFEST_BYTES = 16 << 30
MAX_SHOWN = 50  # problems printed; all are counted
_BOM = b"\xef\xbb\xbf"
_SPOOL_BUFFER = 1 << 16
_FP_END = 1 + 64  # a group's spool record: b"G", its fingerprint (hex), Name, TAB, body


@dataclass(frozen=True, slots=True, kw_only=True)
class Group:
    """One valid manifest line, with the exact bytes that will be signed and sent."""

    name: str
    line: int
    body: bytes = field(repr=False)  # canonical JSON: Name, ProjectName, Tags (if any)
    fingerprint: str  # sha256 of body: changes exactly when what we would send changes

    @property
    def payload(self) -> dict[str, Any]:
        loaded: dict[str, Any] = orjson.loads(self.body)
        return loaded


@dataclass(frozen=True, slots=True, kw_only=True)
class Invalid:
    line: int
    name: str | None  # the Name shown and recorded: printable, or None
    problem: Problem
    # Every Name the line could mean (line_names): what `sync --prune` must not delete.
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # The Name shown is one the line could mean, so it is always protected too.
        if self.name is not None and self.name not in self.names:
            object.__setattr__(self, "names", (*self.names, self.name))


@dataclass(frozen=True, slots=True, kw_only=True)
class Scan:
    """What the one pass over the source learnt, and the private copy of what it read.

    A context manager: closing it removes the spool. The spool is an unlinked temporary file
    (mode 0600), so it vanishes with the process even after `kill -9`.
    """

    path: Path
    sha256: str  # of the source's bytes exactly as read (BOM, CR and over-long lines included)
    size: int  # bytes read from the source
    groups: int  # valid lines
    invalid: int  # invalid lines (`read` yields each as Invalid, with its first problem)
    problems: list[Problem]  # every problem, capped at MAX_SHOWN
    problem_count: int  # every problem, counted
    # One record per source line: b"" blank, b"G" name TAB body,
    # b"!" JSON [name, field, reason, names]
    spool: IO[bytes] = field(repr=False, compare=False)
    spool_dir: str = ""  # the spool's folder, for messages
    start: int = 0  # where the spool's records begin (after a remembered spool's header)
    recalled: bool = False  # validated by an earlier run, for these very bytes (`recall`)

    def close(self) -> None:
        _close_quietly(self.spool)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def scan(
    path: Path,
    *,
    spool_dir: Path | None = None,
    max_bytes: int = MAX_MANIFEST_BYTES,
    name_hash: Callable[[str], int] = hash,
    open_spool: Callable[[Path | None], IO[bytes]] | None = None,
) -> Scan:
    """Read `path` once: validate every line and keep a private copy for `read`.

    `path` may be a regular file, a FIFO, /dev/stdin or a process substitution. The spool is
    created in `spool_dir` (default: tempfile's directory; pass the ledger's folder to keep
    it off a small /tmp). Raises ManifestError for a source that cannot be read at all, is
    larger than `max_bytes`, or holds no groups; line problems are returned, not raised.
    `name_hash` is the duplicate check's hash (tests pass a tiny one to force collisions);
    `open_spool(spool_dir)` makes a spool file (default: an unlinked temporary file; tests
    pass one that fails). Every failure of the spool (create, write, flush, read back) is a
    ManifestError naming the manifest, the spool's folder and the reason.
    """
    folder = str(spool_dir) if spool_dir is not None else tempfile.gettempdir()
    opener = open_spool or _temporary_file
    try:
        spool = opener(spool_dir)
    except OSError as exc:
        raise _file_error(path, f"cannot create a spool file in {folder}: {_reason(exc)}") from None
    spooled = _Spooled(path, folder, spool)
    try:
        return _scan(path, spooled, max_bytes, name_hash, lambda: opener(spool_dir))
    except BaseException:
        # Quietly: a buffer that could not be flushed fails again on close, and the error
        # that says why is the one being raised.
        _close_quietly(spooled.spool)
        raise


def read(scanned: Scan) -> Iterator[Group | Invalid]:
    """Stream the spool: each non-blank line as a Group, or as Invalid with its first problem,
    exactly as `scan` judged it. Raises SpoolError when the spool cannot be read back (a
    failing disk): this runs while requests go out, so it is not a ManifestError, whose
    exit code says that nothing was sent."""
    where = str(scanned.path)
    try:
        for lineno, record in _spooled_lines(scanned.spool, scanned.start):
            if record.startswith(b"G"):
                name, _, body = record[_FP_END:].partition(b"\t")
                yield Group(
                    name=name.decode(),
                    line=lineno,
                    body=body,
                    fingerprint=record[1:_FP_END].decode(),
                )
            elif record.startswith(b"!"):
                name, field_name, reason, names = orjson.loads(record[1:])
                yield Invalid(
                    line=lineno,
                    name=name,
                    problem=Problem(where, lineno, field_name, reason),
                    names=tuple(names),
                )
    except OSError as exc:  # only the spool's reads raise it: the consumer's errors stay there
        raise SpoolError(
            f"{scanned.path}: cannot read back its private spool file in "
            f"{scanned.spool_dir}: {_reason(exc)}; the ledger is consistent: run the same "
            "command again"
        ) from None


def _scan(
    path: Path,
    spooled: _Spooled,
    max_bytes: int,
    name_hash: Callable[[str], int],
    open_spool: Callable[[], IO[bytes]],
) -> Scan:
    digest = hashlib.sha256()
    seen = _Seen()
    suspects: set[int] = set()  # hashes seen again: their lines are settled after the pass
    shown: list[Problem] = []
    count = groups = invalid = 0
    source = _Source(path, digest, max_bytes)
    for lineno, raw in source.lines():
        result = _parse(path, lineno, raw)
        if isinstance(result, Group):
            h = name_hash(result.name)
            if seen.add(h):
                suspects.add(h)
            groups += 1
            # A Name holds no TAB (spec.name_problem) and canonical JSON no newline. The
            # fingerprint is kept so that no later pass hashes the body again.
            spooled.write(
                b"G"
                + result.fingerprint.encode()
                + result.name.encode()
                + b"\t"
                + result.body
                + b"\n"
            )
            continue
        if result is None:
            spooled.write(b"\n")  # one spool line per source line keeps numbers true
            continue
        first = result[0]
        names = line_names.names_of(raw)
        record = [_name_of(raw), first.field, first.reason, names]
        spooled.write(b"!" + orjson.dumps(record) + b"\n")
        invalid += 1
        count += len(result)
        shown.extend(result[: max(0, MAX_SHOWN - len(shown))])
    spooled.flush()  # `read` reads the descriptor, not this buffer
    del seen  # before the second pass: its memory is the scan's peak
    if suspects:
        try:
            duplicates = _confirm(spooled.spool, suspects, name_hash)
        except OSError as exc:
            raise spooled.error("read back", exc) from None
        if duplicates:
            _respool(spooled, duplicates, open_spool)
            dup_problems = [
                Problem(str(path), line, "Name", f"{name!r} is already given on line {first}")
                for line, (name, first) in duplicates.items()
            ]
            groups -= len(duplicates)
            invalid += len(duplicates)
            count += len(duplicates)
            merged = heapq.merge(shown, dup_problems[:MAX_SHOWN], key=lambda p: p.line)
            shown = list(merged)[:MAX_SHOWN]
    if groups == 0 and not invalid:
        raise _file_error(
            path, "the manifest holds no groups (it is empty or has only blank lines)"
        )
    return Scan(
        path=path,
        sha256=digest.hexdigest(),
        size=source.size,
        groups=groups,
        invalid=invalid,
        problems=shown,
        problem_count=count,
        spool=spooled.spool,
        spool_dir=spooled.folder,
    )


class _Seen:
    """A set of 32-bit hashes in open-addressing `array('I')` tables (0 marks an empty slot).

    When the newest table is full, a new one twice its size is added and the old ones stay
    as they are: no rehash, so memory never holds an old and a new copy at once (a rehash
    would peak at three times the table). A lookup probes each table (at most ~5 for ten
    million Names), still far below what parsing the line costs. 6 to 11 B per Name.

    32 bits, not 64: ten million Names then make about n²/2³³ ≈ 12 000 chance suspects, which
    the confirming pass settles in a few MB, and the tables take half the memory (67 MB,
    not 134 MB, at ten million). A true duplicate has the same full hash, so the suspects
    keep full hashes and `_confirm` looks at exactly the lines that share one."""

    FIRST_SLOTS = 1 << 16
    MAX_LOAD = 0.7

    def __init__(self) -> None:
        self.tables: list[array[int]] = []
        self.used = self.limit = 0

    def add(self, h: int) -> bool:
        """Add `h`; True if it was there already."""
        h = (h & 0xFFFF_FFFF) or 1
        for table in self.tables:
            mask = len(table) - 1
            i = h & mask
            while (there := table[i]) != 0:
                if there == h:
                    return True
                i = (i + 1) & mask
        if self.used >= self.limit:
            size = len(self.tables[-1]) * 2 if self.tables else self.FIRST_SLOTS
            self.tables.append(array("I", bytes(4 * size)))
            self.used, self.limit = 0, int(size * self.MAX_LOAD)
        table = self.tables[-1]
        mask = len(table) - 1
        i = h & mask
        while table[i] != 0:
            i = (i + 1) & mask
        table[i] = h
        self.used += 1
        return False


def _confirm(
    spool: IO[bytes], suspects: set[int], name_hash: Callable[[str], int]
) -> dict[int, tuple[str, int]]:
    """Settle the suspects by their Names: {line: (Name, first line)} for each real
    duplicate. One pass over the spool; it holds only the Names whose hash was seen twice."""
    first: dict[str, int] = {}
    duplicates: dict[int, tuple[str, int]] = {}
    for lineno, record in _spooled_lines(spool):
        if not record.startswith(b"G"):
            continue
        name = record[_FP_END:].partition(b"\t")[0].decode()
        if name_hash(name) not in suspects:
            continue
        earlier = first.setdefault(name, lineno)
        if earlier != lineno:
            duplicates[lineno] = (name, earlier)
    return duplicates


def _respool(
    spooled: _Spooled, duplicates: dict[int, tuple[str, int]], open_spool: Callable[[], IO[bytes]]
) -> None:
    """Replace the spool by a copy with each duplicate's record turned into its problem."""
    try:
        out = open_spool()
    except OSError as exc:
        raise spooled.error("create another", exc) from None
    copy = _Spooled(spooled.path, spooled.folder, out)
    try:
        try:
            for lineno, record in _spooled_lines(spooled.spool):
                if lineno in duplicates:
                    name, first = duplicates[lineno]
                    reason = f"{name!r} is already given on line {first}"
                    record = b"!" + orjson.dumps([name, "Name", reason, [name]])
                copy.write(record + b"\n")
        except OSError as exc:  # the reads: `copy.write` raises ManifestError itself
            raise spooled.error("read back", exc) from None
        copy.flush()
    except BaseException:
        _close_quietly(out)
        raise
    _close_quietly(spooled.spool)
    spooled.spool = out


class _Spooled:
    """The spool while `scan` writes it: its OSErrors become ManifestErrors that name the
    manifest, the spool's folder and the reason."""

    def __init__(self, path: Path, folder: str, spool: IO[bytes]) -> None:
        self.path = path
        self.folder = folder
        self.spool = spool

    def write(self, data: bytes) -> None:
        try:
            self.spool.write(data)
        except OSError as exc:
            raise self.error("write", exc) from None

    def flush(self) -> None:
        try:
            self.spool.flush()
        except OSError as exc:
            raise self.error("write", exc) from None

    def error(self, doing: str, exc: OSError) -> ManifestError:
        return _file_error(
            self.path,
            f"cannot {doing} its private spool file in {self.folder}: {_reason(exc)}",
        )


class _Source:
    """The source, read once in bounded lines, hashed as it is read, size-capped."""

    def __init__(self, path: Path, digest: Any, max_bytes: int) -> None:
        self.path = path
        self.digest = digest
        self.max_bytes = max_bytes
        self.size = 0

    def lines(self) -> Iterator[tuple[int, bytes]]:
        """(line number, content without BOM and line end); b"" marks an over-long line,
        which the parser cannot confuse with a blank one (that is b" ")."""
        with self._open() as f:
            lineno = 0
            while raw := self._readline(f, MAX_LINE_BYTES + 1):
                lineno += 1
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    self._skip_rest(f, lineno, len(raw))
                    yield lineno, b""
                    continue
                if lineno == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM) :]
                yield lineno, raw.rstrip(b"\r\n") or b" "

    def _skip_rest(self, f: IO[bytes], lineno: int, length: int) -> None:
        """Read past the end of an over-long line, in bounded pieces."""
        while (rest := self._readline(f, MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
            length += len(rest)
            if length > MAX_SKIPPED_LINE_BYTES:
                raise _file_error(
                    self.path,
                    f"line {lineno} is longer than "
                    f"{MAX_SKIPPED_LINE_BYTES} bytes: this is not a JSONL "
                    "manifest",
                )

    def _open(self) -> IO[bytes]:
        path = self.path
        try:
            # A FIFO blocks here until its writer opens it, as `cat` would: opening it
            # non-blocking would read an empty pipe as an empty manifest.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except IsADirectoryError:
            raise _file_error(path, "is a directory, not a file") from None
        except FileNotFoundError:
            raise _file_error(path, "no such file") from None
        except OSError as exc:
            kind = _kind(path)
            reason = f"is {kind}, not a file" if kind else f"cannot open it: {exc.strerror}"
            raise _file_error(path, reason) from None
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise _file_error(path, "is a directory, not a file")
            if stat.S_ISSOCK(mode):
                raise _file_error(path, "is a socket, not a file")
        except BaseException:
            os.close(fd)
            raise
        return open(fd, "rb", buffering=_SPOOL_BUFFER)  # the caller closes it

    def _readline(self, f: IO[bytes], limit: int) -> bytes:
        try:
            raw = f.readline(limit)
        except OSError as exc:
            raise _file_error(self.path, f"cannot read it: {exc.strerror}") from None
        self.size += len(raw)
        if self.size > self.max_bytes:
            raise _file_error(
                self.path,
                f"is larger than {self.max_bytes} bytes: split it "
                "(or it is a device that never ends)",
            )
        self.digest.update(raw)
        return raw


def _kind(path: Path) -> str | None:
    """'a socket' etc. for a path open() refused because of what it is, else None."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    return None


class _Pread(io.RawIOBase):
    """Reads the spool at its own offset (os.pread), so passes never disturb each other."""

    def __init__(self, spool: IO[bytes], start: int = 0) -> None:
        self._fd = spool.fileno()
        self._offset = start

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = os.pread(self._fd, len(buffer), self._offset)
        buffer[: len(data)] = data
        self._offset += len(data)
        return len(data)


def _spooled_lines(spool: IO[bytes], start: int = 0) -> Iterator[tuple[int, bytes]]:
    # Unbounded readline is safe here: `scan` wrote every line, none longer than a manifest
    # line may be (a remembered spool's were checked by its sha256: see _recall).
    with io.BufferedReader(_Pread(spool, start), _SPOOL_BUFFER) as f:
        for lineno, raw in enumerate(f, start=1):
            yield lineno, raw[:-1]


def _temporary_file(folder: Path | None) -> IO[bytes]:
    return tempfile.TemporaryFile(dir=folder)  # the Scan owns it and closes it


def _close_quietly(spool: IO[bytes]) -> None:
    """Close the spool and let go of its descriptor whatever happens (a buffered file
    whose flush fails still closes its descriptor, then raises)."""
    try:
        spool.close()
    except OSError:
        pass  # an unlinked scratch copy: nothing in it is needed any more


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _file_error(path: Path, reason: str) -> ManifestError:
    return ManifestError([Problem(str(path), 0, "", reason)], 1)


def _parse(path: Path, lineno: int, raw: bytes) -> Group | list[Problem] | None:
    """A Group, the line's problems, or None for a blank line."""
    where = str(path)

    def problem(field_name: str, reason: str) -> list[Problem]:
        return [Problem(where, lineno, field_name, reason)]

    if raw == b"":
        return problem("line", f"is longer than {MAX_LINE_BYTES} bytes")
    if (nul := raw.find(b"\x00")) >= 0:
        return problem("line", f"holds a NUL byte at byte {nul + 1}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return problem("line", f"is not valid UTF-8 (byte {exc.start + 1})")
    if not text.strip():
        return None
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return problem("line", f"is not valid JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(obj, dict):
        return problem("line", f"must be a JSON object, not {spec.json_type(obj)}")
    if (twice := _repeated_key(text, obj)) is not None:
        # JSON parsers disagree on which one counts (orjson keeps the last): ambiguous, so
        # refused rather than guessed.
        return problem(twice, "is given twice in one object; give it once")
    problems = [
        Problem(where, lineno, spec.label(k), "unknown field (allowed: Name, ProjectName, Tags)")
        for k in sorted(set(obj) - spec.CREATE_FIELDS)
    ]
    name = obj.get("Name")
    if "Name" not in obj:
        problems.append(Problem(where, lineno, "Name", "is required"))
    elif (reason := spec.name_problem(name)) is not None:
        problems.append(Problem(where, lineno, "Name", reason))
    project = obj.get("ProjectName", spec.DEFAULT_PROJECT)
    if not isinstance(project, str):
        problems.append(
            Problem(
                where, lineno, "ProjectName", f"must be a string, not {spec.json_type(project)}"
            )
        )
    elif not project:
        problems.append(
            Problem(where, lineno, "ProjectName", "must not be empty (leave it out for 'default')")
        )
    tags = obj.get("Tags", [])
    problems.extend(Problem(where, lineno, f, r) for f, r in spec.tags_problems(tags))
    if problems:
        return problems
    assert isinstance(name, str)
    return _group(name, project, tags, lineno)


def _repeated_key(text: str, obj: dict[str, Any]) -> str | None:
    """The field given twice in one object of this (valid JSON) line, or None.

    Cheap for every line: a key is written as `"...":`, so when the line holds exactly as
    many of those as the decoded line has keys (at the top and in its tags), no key was
    lost to a repeat. Anything that could blur that count (an escape, a space before a
    colon, an object nested deeper) sends the line to the exact check instead: decoded
    again by the standard library, which shows every key."""
    tags = obj.get("Tags")
    keys = len(obj)
    if isinstance(tags, list):
        keys += sum(len(t) for t in tags if isinstance(t, dict))
    if (
        text.count('":') == keys
        and "\\" not in text
        and '" ' not in text
        and '"\t' not in text
        and '"\r' not in text
    ):
        return None
    found: list[tuple[str, dict[str, Any]]] = []  # the first key given twice, its object

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        made = dict(items)
        if not found and len(made) != len(items):
            keys = [k for k, _ in items]
            found.append((next(k for i, k in enumerate(keys) if k in keys[:i]), made))
        return made

    decoded = json.loads(text, object_pairs_hook=pairs)
    if not found:
        return None
    key, where = found[0]
    tags = decoded.get("Tags")
    if where is not decoded and isinstance(tags, list):
        for i, tag in enumerate(tags):
            if tag is where:
                return f"Tags[{i}].{spec.label(key)}"
    return spec.label(key)


def _group(name: str, project: str, tags: list[dict[str, str]], lineno: int) -> Group:
    body: dict[str, Any] = {"Name": name, "ProjectName": project}
    if tags:
        body["Tags"] = [
            {"Key": t["Key"], "Value": t["Value"], "Category": t["Category"]} for t in tags
        ]
    encoded = orjson.dumps(body)
    return Group(
        name=name, line=lineno, body=encoded, fingerprint=hashlib.sha256(encoded).hexdigest()
    )


def _name_of(raw: bytes) -> str | None:
    """The Name of an invalid line, if it has a usable one (for the ledger and report)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    name = obj.get("Name") if isinstance(obj, dict) else None
    # Printable only: the Name goes to the ledger, reports and the terminal.
    ok = isinstance(name, str) and len(name) <= 200 and name.isprintable()
    return name if ok else None


# -- a validation remembered --------------------------------------------------------------
#
# Validating 10^6 lines costs seconds (a JSON parse and the body rules per line), and a
# nightly sync or a resume reads the very same bytes again. So a run that goes ahead keeps
# its spool beside the ledger (`remember`), and the next scan of a regular file first hashes
# the source (cheap: no parse) and, if the sha256 and size are those the remembered spool was
# made from, under the same validation rules, reads that spool instead of validating again
# (`recall`). The spool is derived and never trusted blindly: it must be a regular file of
# ours (owner, no symbolic link), its header must parse, and one sha256 over its header's
# fields and its records must match (so a torn or edited copy is validated afresh). The
# rules are the code that validates (api/spec.py and this module), hashed: an upgrade, even one
# that keeps the version number, validates afresh. Deleting the spool is always safe. It
# never stops a run: a spool that cannot be kept or read is simply not used, and it is not
# kept when it would leave the disk with less free space than its own size (or 64 MiB): the
# ledger needs that room more.

_REMEMBERED_FORMAT: Final = "worker-spool/3"  # 3: an invalid line's record holds its names
_MAX_HEADER_BYTES: Final = 1 << 20
_COPY_BYTES: Final = 1 << 20
_MIN_FREE_BYTES: Final = 64 << 20


@functools.cache
def _rules() -> str | None:
    """A digest of the code that validates a manifest; None when it cannot be read (then
    nothing is remembered or recalled)."""
    digest = hashlib.sha256(__version__.encode())
    try:
        for module in (spec.__file__, line_names.__file__, __file__):
            with open(module, "rb") as f:
                digest.update(f.read())
    except (OSError, TypeError):
        return None
    return digest.hexdigest()


def remembered_path(ledger: Path) -> Path:
    """`<ledger>.spool`, beside the file the ledger path finally names."""
    real = Path(os.path.realpath(ledger))
    return real.with_name(real.name + ".spool")


def recall(path: Path, remembered: Path, *, max_bytes: int = MAX_MANIFEST_BYTES) -> Scan | None:
    """The Scan a previous run remembered for exactly the bytes now at `path`, or None (no
    such spool, another manifest, other rules, damage, or `path` is not a regular file: a
    pipe can be read only once, by `scan`)."""
    if _rules() is None:
        return None
    try:
        fd = os.open(remembered, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        os.close(fd)  # not a file we wrote
        return None
    f = io.FileIO(fd, "rb")  # closes fd from now on
    try:
        scanned = _recalled(path, f, max_bytes)
    except (OSError, ValueError, TypeError, KeyError):  # JSONDecodeError is a ValueError
        scanned = None
    except BaseException:
        f.close()
        raise
    if scanned is None:
        f.close()
    return scanned


def _recalled(path: Path, f: IO[bytes], max_bytes: int) -> Scan | None:
    info = os.fstat(f.fileno())
    head = os.pread(f.fileno(), _MAX_HEADER_BYTES, 0).partition(b"\n")
    if not head[1]:
        return None
    meta = orjson.loads(head[0])
    if (
        not isinstance(meta, dict)
        or meta.get("format") != _REMEMBERED_FORMAT
        or meta.get("rules") != _rules()
    ):
        return None
    start = len(head[0]) + 1
    if info.st_size - start != meta["records_bytes"]:
        return None
    source = _source_digest(path, max_bytes)
    if source is None or source != (meta["source_sha256"], meta["source_size"]):
        return None
    sealed = meta.pop("sha256")
    if _seal(meta, f.fileno(), start) != sealed:
        return None
    where = str(path)
    problems = [
        Problem(where, int(line), str(fld), str(why)) for line, fld, why in meta["problems"]
    ]
    return Scan(
        path=path,
        sha256=source[0],
        size=source[1],
        groups=int(meta["groups"]),
        invalid=int(meta["invalid"]),
        problems=problems,
        problem_count=int(meta["problem_count"]),
        spool=f,
        spool_dir=str(Path(os.path.realpath(path)).parent),
        start=start,
        recalled=True,
    )


def remember(scanned: Scan, remembered: Path) -> str | None:
    """Keep `scanned`'s spool at `remembered` for the next run's `recall` (atomically: a
    new file renamed over the old). Best effort: returns why it was not kept, or None.
    The caller holds the ledger's lock: no other run writes this spool meanwhile, so the
    scratch copies a killed run left (`.<name>.*`) are removed here."""
    if scanned.recalled:
        return None
    rules = _rules()
    if rules is None:
        return "the validation code cannot be read"
    folder = remembered.parent
    try:
        records = os.fstat(scanned.spool.fileno()).st_size - scanned.start
        _remove_scratch(folder, remembered.name)
        disk = os.statvfs(folder)
    except OSError as exc:
        return _reason(exc)
    room = disk.f_bavail * disk.f_frsize - records
    if room < max(records, _MIN_FREE_BYTES):
        return f"it would leave {max(room, 0) >> 20} MiB free in {folder}"
    meta: dict[str, Any] = {
        "format": _REMEMBERED_FORMAT,
        "rules": rules,
        "source_sha256": scanned.sha256,
        "source_size": scanned.size,
        "groups": scanned.groups,
        "invalid": scanned.invalid,
        "problem_count": scanned.problem_count,
        "problems": [[p.line, p.field, p.reason] for p in scanned.problems],
        "records_bytes": records,
    }
    header = orjson.dumps({**meta, "sha256": _seal(meta, scanned.spool.fileno(), scanned.start)})
    if len(header) >= _MAX_HEADER_BYTES:
        return "its header is too long"
    try:
        tmp_fd, tmp_name = tempfile.mkstemp(prefix=f".{remembered.name}.", dir=folder)
    except OSError as exc:
        return _reason(exc)
    try:
        with open(tmp_fd, "wb") as out:
            out.write(header + b"\n")
            spool_fd, copied = scanned.spool.fileno(), 0
            while copied < records and (
                chunk := os.pread(spool_fd, _COPY_BYTES, scanned.start + copied)
            ):
                out.write(chunk)
                copied += len(chunk)
        os.replace(tmp_name, remembered)
    except BaseException as exc:  # a signal mid-copy too: no scratch copy is left behind
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        if isinstance(exc, OSError):
            return _reason(exc)
        raise
    return None


def _seal(meta: dict[str, Any], fd: int, start: int) -> str:
    """sha256 over the header's fields (canonical JSON) and then the records."""
    digest = hashlib.sha256(orjson.dumps(meta, option=orjson.OPT_SORT_KEYS) + b"\n")
    offset = start
    while chunk := os.pread(fd, _COPY_BYTES, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def _remove_scratch(folder: Path, name: str) -> None:
    """Scratch copies `remember` left when its process was killed mid-copy."""
    prefix = f".{name}."
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(prefix) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def digest(path: Path, *, max_bytes: int = MAX_MANIFEST_BYTES) -> str | None:
    """The sha256 of a regular file's bytes, without validating them (to tell whether a
    manifest is the one a run used before scanning it); None for anything else, or a file
    that cannot be read."""
    try:
        got = _source_digest(path, max_bytes)
    except OSError:
        return None
    return got[0] if got is not None else None


def _source_digest(path: Path, max_bytes: int) -> tuple[str, int] | None:
    """(sha256, size) of a regular file's bytes, or None for anything else."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        # Not even opened: opening and closing a FIFO would wake its writer, and it could
        # then write to a pipe with no reader (SIGPIPE) before `scan` opens it again.
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        digest = hashlib.sha256()
        size = 0
        while chunk := os.read(fd, _COPY_BYTES):
            size += len(chunk)
            if size > max_bytes:
                return None  # `scan` says why
            digest.update(chunk)
        return digest.hexdigest(), size
    finally:
        os.close(fd)
