"""The ledger's locks: who may write a ledger, and whether someone is writing one now.

A run holds two `flock`s, both exclusive, both dropped by the kernel when the process dies
(so `kill -9` leaves no stale lock):

* one on the ledger file itself (its open descriptor: the inode, whatever path leads to
  it), so no other path to the file (a hard link, the name it was renamed to) lets a
  second run in;
* one on `<ledger>.lock`, a file beside the path that is never deleted (deleting lock files
  races), so a ledger renamed away does not let a second run start a new one at its old
  path, and a worker of an older version (which takes only this one) is kept out too.

`report` probes both (`probe_lock`) to tell a running run from a crashed one.

Who holds it: once a run has both locks it writes a `Holder` (pid, host, command, start)
into `<ledger>.lock` (truncate, then write; cleared again when it lets go), and a second run
that finds the lock held names it in its exit-5 message. Because the kernel drops `flock` on
death, "locked" always means a live process: the pid and host are there to check with `ps`.
The file is only a note, never the lock: it is read bounded and defensively (an older worker
leaves it empty; anything else there is not believed).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import orjson

from worker.errors import LedgerError, LedgerLocked
from worker.ledger.file import close_quietly

# How long `open` retries a held lock before saying "locked": long enough to ride out a
# `report` probing the lock (microseconds), far shorter than any run that really holds it.
LOCK_WAIT_S: Final = 0.5


# A holder note is ~200 bytes; what is read of the lock file is bounded by this.
MAX_HOLDER_BYTES: Final = 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class Holder:
    """Who holds a ledger's lock: what a second run tells its user (exit 5)."""

    pid: int
    host: str
    command: str  # "worker run groups.jsonl": the command and the manifest's name, no flags
    started: str  # ISO 8601 UTC

    def __post_init__(self) -> None:
        if self.pid <= 0:
            raise ValueError(f"pid must be positive, not {self.pid}")

    @classmethod
    def this_process(cls, command: str, started: str) -> Holder:
        return cls(pid=os.getpid(), host=socket.gethostname(), command=command, started=started)

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {"pid": self.pid, "host": self.host, "command": self.command, "started": self.started}
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Holder | None:
        """The holder a lock file names, or None for anything else (empty, an older worker's
        file, garbage): fields are type-checked, cut short and their control characters
        escaped, since whoever wrote them is not us for certain."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict):
            return None
        pid, texts = obj.get("pid"), [obj.get(k) for k in ("host", "command", "started")]
        if type(pid) is not int or not 0 < pid < 1 << 31:
            return None
        if not all(isinstance(t, str) for t in texts):
            return None
        host, command, started = (_shown(str(t)) for t in texts)
        return cls(pid=pid, host=host, command=command, started=started)

    def __str__(self) -> str:
        return f"pid {self.pid} on host {self.host} ({self.command}, started {self.started})"


def _shown(text: str, limit: int = 300) -> str:
    """`text` fit for a terminal: cut short, what it would act on escaped."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text[:limit])


def read_holder(fd: int) -> Holder | None:
    """The holder named in an open lock file (bounded read), or None."""
    try:
        data = os.pread(fd, MAX_HOLDER_BYTES + 1, 0)
    except OSError:
        return None
    if not data or len(data) > MAX_HOLDER_BYTES:
        return None
    return Holder.from_bytes(data)


def _write_holder(fd: int, holder: Holder) -> None:
    """Name the holder in the lock file we hold. A note, not the lock: a full disk must not
    stop the run, it only leaves a second run unable to say who holds it."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.to_bytes() + b"\n", 0)


def locked_message(path: Path, lock: Path, holder: Holder | None) -> str:
    """Exit 5's message: who holds the lock, and why that is a live process."""
    if holder is None:
        who = (
            "a run that did not say who it is (a worker of an older version, or one "
            f"starting this instant; `fuser {lock}` shows its pid on this host)"
        )
        check = "wait for it to end, or stop it"
    else:
        who = str(holder)
        check = (
            f"check it with `ps -p {holder.pid}` on {holder.host}; wait for it to end, or stop it"
        )
    return (
        f"another run is using {path}: {who} holds its lock {lock}. A held lock is always "
        "a live process (the kernel drops it when its holder exits, even by kill -9, so "
        f"there is no stale lock to delete): {check}"
    )


def lock_path(ledger: Path) -> Path:
    """`<ledger>.lock` beside the file the path finally names (symbolic links resolved), so
    every path to one ledger shares one lock."""
    real = Path(os.path.realpath(ledger))
    return real.with_name(real.name + ".lock")


def lock_beside(path: Path, holder: Holder | None = None) -> int:
    """Lock `<ledger>.lock` (created if missing), waiting out a probe (LOCK_WAIT_S), and
    name `holder` in it; its descriptor, which holds the lock until closed."""
    lock = lock_path(path)
    try:
        fd = os.open(
            lock,
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
            0o644,
        )
    except OSError as exc:
        raise LedgerError(
            f"{path}: cannot create its lock file {lock}: {exc.strerror}; nothing was changed"
        ) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise LedgerError(f"{lock}: the ledger's lock file is not a regular file")
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LedgerLocked(locked_message(path, lock, read_holder(fd))) from None
                time.sleep(0.02)
                continue
            if holder is not None:
                _write_holder(fd, holder)
            return fd
    except OSError as exc:
        os.close(fd)
        raise LedgerError(f"{lock}: cannot lock it: {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        raise


def lock_file(path: Path, fd: int) -> None:
    """`flock` the ledger's own open file (the inode, whatever path leads to it), waiting
    out a `report` probe (LOCK_WAIT_S). Released by `release`."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise LedgerLocked(
                    f"another run is using {path}: it holds the lock on the ledger file "
                    "itself, opened by another path to the same file (a hard link, or the "
                    "name it had before a rename; that path's .lock names the run). A held "
                    "lock is always a live process: the kernel drops it when its holder exits"
                ) from None
            time.sleep(0.02)
        except OSError as exc:
            raise LedgerError(f"{path}: cannot lock the ledger: {exc.strerror}") from None


def release(fd: int, lock_fd: int) -> None:
    """Unlock the ledger's file, then close it and the lock file. Unlocked explicitly: the
    index keeps a duplicate of `fd` (same open file, same lock) after the ledger closes."""
    if fd >= 0:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
    if lock_fd >= 0:
        with contextlib.suppress(OSError):  # still held: no one else is writing it
            os.ftruncate(lock_fd, 0)  # the holder note goes with the holder
    close_quietly(fd, lock_fd)


def probe_lock(path: Path) -> bool | None:
    """Whether a process holds the ledger's lock now (a run is going on): True, False, or
    None when it cannot be told. Probes both locks a run holds (the ledger file's and the
    lock file's, module docstring): either held means running. Takes each for an instant
    and drops it at once; a run starting in that instant waits it out (LOCK_WAIT_S). Never
    creates a file."""
    beside = _probe(lock_path(path), os.O_NOFOLLOW)
    if beside is True:
        return True
    itself = _probe(path, 0)
    if itself is True:
        return True
    return None if None in (beside, itself) else False


def _probe(path: Path, flags: int) -> bool | None:
    """Whether someone holds `flock` on the regular file at `path` (shared is enough to
    tell: it conflicts with a run's exclusive lock, not with another probe's)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY | flags)
    except FileNotFoundError:
        return False  # no run has ever locked it (or there is no ledger)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
