"""A validation remembered: a run keeps its validated spool beside the ledger, and the next
scan of the very same bytes reads it instead of validating again.

Validating 10^6 lines costs seconds (a JSON parse and the body rules per line), and a
nightly sync or a resume reads the very same bytes again. So a run that goes ahead keeps
its spool beside the ledger (`remember`), and the next scan of a regular file first hashes
the source (cheap: no parse) and, if the sha256 and size are those the remembered spool was
made from, under the same validation rules, reads that spool instead of validating again
(`recall`). The spool is derived and never trusted blindly: it must be a regular file of
ours (owner, no symbolic link), its header must parse, and one sha256 over its header's
fields and its records must match (so a torn or edited copy is validated afresh). The
rules are the code that validates (`rule_files`: the API's rules and every module of the
manifest package), hashed: an upgrade, even one that keeps the version number, validates
afresh. Deleting the spool is always safe. It never stops a run: a spool that cannot be kept
or read is simply not used, and it is not kept when it would leave the disk with less free
space than its own size (or 64 MiB): the ledger needs that room more.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Any, Final

import orjson

from worker import __version__
from worker.api import spec
from worker.errors import Problem
from worker.manifest.values import MAX_MANIFEST_BYTES, Scan, strerror

_REMEMBERED_FORMAT: Final = "worker-spool/3"  # 3: an invalid line's record holds its names
_MAX_HEADER_BYTES: Final = 1 << 20
_COPY_BYTES: Final = 1 << 20
_MIN_FREE_BYTES: Final = 64 << 20


def rule_files() -> list[Path]:
    """The code that decides what is valid and how the spool holds it: the API's rules and
    every module of the manifest package, in a fixed order. OSError when it cannot be
    found (a zipped install): then nothing is remembered or recalled."""
    package = sorted(Path(__file__).parent.glob("*.py"))
    if spec.__file__ is None or not package:
        raise OSError("the validation code is not in files")
    return [Path(spec.__file__), *package]


@functools.cache
def _rules() -> str | None:
    """A digest of the code that validates a manifest; None when it cannot be read (then
    nothing is remembered or recalled)."""
    digest = hashlib.sha256(__version__.encode())
    try:
        for module in rule_files():
            digest.update(module.name.encode() + b"\0" + module.read_bytes())
    except OSError:
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
        return strerror(exc)
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
        return strerror(exc)
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
            return strerror(exc)
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
