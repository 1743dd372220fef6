"""Paths a user gives (flags, job-file keys, WORKER_* variables), checked before anything runs.

A path the operating system cannot even look up — a name longer than the file system allows,
a parent that is a file, a loop of symlinks, a folder we may not enter — is the user's
mistake, not a bug: it is refused here with a message that names where the path came from
(exit 2), on a dry run too, before a ledger, a lock or a spool is created. Whether the file
is there, and of the right kind, is left to the step that opens it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from worker.api import spec
from worker.errors import UsageError

_WHY = {
    errno.ENAMETOOLONG: "a name in it is longer than the file system allows",
    errno.ENOTDIR: "a folder in it is a file",
    errno.ELOOP: "it loops through symbolic links",
    errno.EACCES: "permission denied on a folder in it",
}


Named = str | Callable[[], str]  # where the path came from; a callable is asked only on error


def check_path(path: Path, named: Named) -> None:
    """A UsageError naming `named` (a flag, a job-file key, a variable) unless `path` can be
    looked up: it exists, or it does not and could be created."""
    try:
        os.stat(path)
    except FileNotFoundError:
        # May not exist yet (a ledger), or the step that opens it will say so. The OS stops
        # at the first missing folder, so a name too long further on is looked for here.
        if _too_long(path):
            why = _WHY[errno.ENAMETOOLONG]
            raise UsageError(f"{_name(named)} {shown_path(path)}: {why}") from None
        return
    except ValueError:  # a NUL character: no path the OS can take
        raise UsageError(f"{_name(named)} {shown_path(path)}: holds a NUL character") from None
    except OSError as exc:
        why = _WHY.get(exc.errno or 0) or exc.strerror or type(exc).__name__
        raise UsageError(f"{_name(named)} {shown_path(path)}: {why}") from None


def _too_long(path: Path) -> bool:
    """True when a name in `path`, or the whole, is longer than its file system allows."""
    ancestor = Path(os.path.abspath(path)).parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    try:
        name_max = os.pathconf(ancestor, "PC_NAME_MAX")
        path_max = os.pathconf(ancestor, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096  # Linux's, when the file system does not say
    if len(os.fsencode(os.path.abspath(path))) >= path_max:
        return True
    return any(len(os.fsencode(part)) > name_max for part in path.parts)


def _name(named: Named) -> str:
    return named if isinstance(named, str) else named()


def check_paths(paths: Iterable[tuple[Path, Named]]) -> None:
    for path, named in paths:
        check_path(path, named)


def shown_path(path: Path) -> str:
    """The path fit for a message: as it is when short and plain, else its bounded repr."""
    text = str(path)
    if text.isprintable() and len(text) <= 120:
        return text
    return spec.shown(text, 80) + f" ({len(text)} characters)"
