"""`worker export`: the account's available groups as a manifest, sorted by Name."""

from __future__ import annotations

import contextlib
import os
import stat
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

import orjson
import structlog

from worker.commands.sync import list_account
from worker.errors import Exit, UsageError
from worker.plan.export import stream_lines
from worker.session import Opened, Session, carry_out

log = structlog.get_logger("worker")


def export(session: Session, projects: frozenset[str], output: Path | None) -> Exit:
    """`worker export`: the account's available groups as a manifest, sorted by Name."""
    if output is not None:
        check_output(output)

    async def work(opened: Opened) -> Exit:
        log.info("export.start", credentials=opened.source)
        with await list_account(opened.runner) as listing:
            # The store walks its groups in Name order: sorted on disk, streamed out.
            lines = stream_lines(listing.groups.values(), projects or None)
            _write(lines, output, opened.session.out)
        return Exit.OK

    return carry_out(session, work)


def _write(lines: Iterable[bytes], output: Path | None, out: IO[str]) -> None:
    counted = _Counted(lines)
    if output is None:
        out.flush()
        out.buffer.writelines(counted)  # type: ignore[attr-defined]
        out.flush()
    else:
        _write_atomically(output, counted)
    log.info("export.done", groups=counted.n, output=str(output) if output else "stdout")


class _Counted:
    """The lines, counted as they stream past."""

    def __init__(self, lines: Iterable[bytes]) -> None:
        self._lines = lines
        self.n = 0

    def __iter__(self) -> Iterator[bytes]:
        for line in self._lines:
            self.n += 1
            yield line


def _write_atomically(path: Path, lines: Iterable[bytes]) -> None:
    """Write beside the target, fsync, rename: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UsageError(f"-o {path}: cannot write it: {exc.strerror}") from None


def check_output(path: Path) -> None:
    """-o may create a file, or replace a manifest (a previous export); nothing else. A
    ledger, the sandbox's account, a metrics file or a config file given by mistake is refused
    untouched, before anything is listed."""
    if str(path) in ("", "-"):
        raise UsageError("-o needs a file name (leave -o out to write to stdout)")
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UsageError(f"-o {path}: cannot look at it: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise UsageError(f"-o {path}: is a symbolic link; give the file it points to")
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"-o {path}: not a regular file")
    if info.st_size == 0:
        return
    try:
        with path.open("rb") as f:
            first = f.readline(64 * 1024)
    except OSError as exc:
        raise UsageError(f"-o {path}: cannot read it: {exc.strerror}") from None
    try:
        head = orjson.loads(first.lstrip(b"\xef\xbb\xbf"))
    except orjson.JSONDecodeError:
        head = None
    if not (isinstance(head, dict) and "Name" in head and "type" not in head):
        raise UsageError(
            f"-o {path}: refusing to replace a file that is not a manifest (a ledger, an "
            "account file, something else); nothing was changed. Remove it or choose "
            "another name"
        )
