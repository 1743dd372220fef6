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
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import time
from pathlib import Path
from typing import Final

from worker.errors import LedgerError, LedgerLocked
from worker.ledger.file import close_quietly

# How long `open` retries a held lock before saying "locked": long enough to ride out a
# `report` probing the lock (microseconds), far shorter than any run that really holds it.
LOCK_WAIT_S: Final = 0.5


def lock_path(ledger: Path) -> Path:
    """`<ledger>.lock` beside the file the path finally names (symbolic links resolved), so
    every path to one ledger shares one lock."""
    real = Path(os.path.realpath(ledger))
    return real.with_name(real.name + ".lock")


def lock_beside(path: Path) -> int:
    """Lock `<ledger>.lock` (created if missing), waiting out a probe (LOCK_WAIT_S); its
    descriptor, which holds the lock until closed."""
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
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LedgerLocked(f"another run is using {path} (lock {lock})") from None
                time.sleep(0.02)
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
                    "name it had before a rename)"
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
