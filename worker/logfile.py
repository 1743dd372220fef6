"""--log-file: checked before anything runs, then opened for appending.

A path a user gives (a flag, a job-file key, WORKER_LOG_FILE): a typo must not append log
lines to the ledger, its lock, index or remembered spool, the manifest or the sandbox's
account, so those are refused by name (exit 2), as are a folder, a symbolic link and anything
that is not a regular file. The file is opened append-only, created 0600 (a log names the
account's groups and the endpoint), and never through a symbolic link (O_NOFOLLOW), so a
link planted where the log goes cannot redirect the writes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from worker.errors import UsageError
from worker.userpaths import check_path, shown_path


def check_log_file(path: Path, named: str, *, not_these: Iterable[Path]) -> None:
    """A UsageError naming `named` unless `path` is a new file or a regular file we may
    append to that the run does not otherwise need."""
    check_path(path, named)
    shown = f"{named} {shown_path(path)}"
    real = os.path.realpath(path)
    for other in not_these:
        if real == os.path.realpath(other):
            raise UsageError(
                f"{shown}: that is {shown_path(other)}, which the run needs; "
                "choose another file (e.g. NAME.log)"
            )
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UsageError(f"{shown}: cannot look at it: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{shown}: is a folder; give a file in it (e.g. worker.log)")
    if stat.S_ISLNK(info.st_mode):
        raise UsageError(f"{shown}: is a symbolic link; give the file it names")
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{shown}: not a regular file")


def open_log_file(path: Path, named: str) -> int:
    """The file's descriptor, for appending; created 0600 when new."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise UsageError(
            f"{named} {shown_path(path)}: cannot open it: {exc.strerror or exc}"
        ) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped after the check: not a file now
            raise UsageError(f"{named} {shown_path(path)}: not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
