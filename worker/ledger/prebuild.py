"""The ledger's index rebuilt in a second process while the manifest is validated.

Why. With nothing remembered (after an upgrade, a moved ledger, a lost index) a run at 10^6
lines validated its manifest (~7 s) and then rebuilt the index from the ledger (~11 s), one
after the other on one core of two. Neither needs the other. So `start` forks a child that
builds the index from the ledger as it is now, into a file with no name beside it
(O_TMPFILE), sealed as a clean index of the prefix it read, while the parent validates.
`Ledger.open`, holding the lock, takes it (`Prebuild.take`), gives it the index's name
(after removing whatever index was there: it was not current, or no child was started) and
then reads it like any index found on disk: `index.read_index` believes it only if it
describes a prefix of this very ledger (same file, same first line, the same bytes before
its end, which is a line's end), and the run reads the ledger on from there (what another
run appended meanwhile). The child's work is trusted no more than any index on disk.

When not: no ledger, an empty one, an index that is current or a checkpoint to read on from
(then there is nothing to rebuild), no `fork` (another thread runs: a forked child could
find a lock held forever), no O_TMPFILE in the ledger's folder, no /proc to name the file
through. Then the run rebuilds the index itself, as before.

The child never writes the ledger or its lock, never logs, and leaves nothing behind: its
file has no name until the parent gives it one. A child that fails (a damaged or foreign
ledger, a full disk, more Names than its table holds) exits 1 and the run rebuilds the
index itself, saying what is wrong as it always did. `cancel` (a manifest with errors, an
interrupt, the index after all current) kills the child; a parent killed with -9 leaves a
child that notices (its parent changed) and exits, and its file goes with it.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import mmap
import os
import signal
import stat
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NoReturn

from worker.ledger import index, premark
from worker.ledger.build import regions_for
from worker.ledger.file import Reader, close_quietly
from worker.ledger.layout import Stale, shift_for, slots_for
from worker.ledger.load import fold
from worker.ledger.state import State
from worker.ledger.table import Table

_COUNT_BYTES: Final = 1 << 20


@dataclass(slots=True)
class Prebuild:
    """A child building the index of `ledger` into the unnamed file `fd`."""

    ledger: Path
    pid: int
    fd: int
    board: premark.Board | None = None  # the manifest's lines the child marks done
    ledger_fd: int = -1  # the parent's, to tell whether the marks describe the ledger
    believed: bool = False  # the marks do (`take`)

    def take(self) -> int | None:
        """Wait for the child: the index file's descriptor (the caller's from now on) if it
        built one, else None. Called holding the ledger's lock."""
        status = self._wait()
        fd, self.fd = self.fd, -1
        if status == 0 and fd >= 0:
            if self.board is not None and self.ledger_fd >= 0:
                with contextlib.suppress(OSError):
                    size = os.fstat(self.ledger_fd).st_size
                    self.believed = self.board.believed(size)
            return fd
        close_quietly(fd)
        return None

    def offer(self, entries: Iterable[tuple[int, str, str]]) -> None:
        """The manifest's valid items (number, Name, fingerprint), for the child to mark
        those the ledger records as done (premark.py); nothing when it cannot use them."""
        if self.board is not None and self.pid > 0:
            premark.offer(self.board, entries)

    def marks(self) -> mmap.mmap | None:
        """A byte per spool item, 1 for a line the ledger records as done as it is now,
        once `take` found they describe the ledger; else None."""
        return self.board.marks if self.believed and self.board is not None else None

    def close(self) -> None:
        """`cancel`, and let the marks go (the plan is over)."""
        self.cancel()
        self.believed = False
        if self.board is not None:
            self.board.close()
            self.board = None

    def cancel(self) -> None:
        """Stop the child if it still runs, and let its file go. Idempotent."""
        if self.pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._wait()
        close_quietly(self.fd, self.ledger_fd)
        self.fd = self.ledger_fd = -1

    def _wait(self) -> int | None:
        """The child's exit code (None: killed by a signal, or already reaped)."""
        pid, self.pid = self.pid, 0
        if pid <= 0:
            return None
        while True:
            try:
                _, status = os.waitpid(pid, 0)
            except InterruptedError:  # a signal handler ran: the wait goes on
                continue
            except ChildProcessError:
                return None
            return os.waitstatus_to_exitcode(status)


@contextlib.contextmanager
def started(ledger: Path, manifest: Path, done_outcomes: bytes = b"") -> Iterator[Prebuild | None]:
    """`start`, and `close` at the end, whatever happens (a prebuild not taken is not
    needed any more, nor are its marks once the plan is over)."""
    prebuild = start(ledger, manifest, done_outcomes)
    try:
        yield prebuild
    finally:
        if prebuild is not None:
            prebuild.close()


def start(ledger: Path, manifest: Path, done_outcomes: bytes = b"") -> Prebuild | None:
    """A child rebuilding the index of `ledger` (module docstring), or None when there is
    no index to rebuild or no child can do it. `manifest` sizes the table (its lines);
    with `done_outcomes` (layout.OUTCOME_NO of the outcomes a plan skips when the
    fingerprint is the line's) the child also marks the lines the run offers (premark.py)."""
    if threading.active_count() > 1 or not hasattr(os, "fork"):
        return None
    if not os.path.isdir(f"/proc/{os.getpid()}/fd"):  # the file is named through it
        return None
    try:
        ledger_fd = os.open(ledger, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not _needs_rebuild(ledger, ledger_fd):
            return None
        folder = os.path.dirname(os.path.realpath(ledger))
        fd = os.open(folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o644)
    except OSError:
        os.close(ledger_fd)
        return None
    lines = _lines(manifest)
    names = max(lines, os.fstat(ledger_fd).st_size // 600)
    slots = slots_for(names)
    regions = regions_for(slots)  # the child's buckets (build.Bulk), the run's too
    b = premark.board(lines, folder, shift_for(regions), regions, done_outcomes)
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        close_quietly(fd, ledger_fd)
        if b is not None:
            b.close()
        return None
    if pid == 0:
        _child(ledger, ledger_fd, fd, folder, slots, parent, b)
    if b is not None:
        close_quietly(b.read_fd)  # the child's end: its EOF is this process's last word
        b.read_fd = -1
    return Prebuild(ledger=ledger, pid=pid, fd=fd, board=b, ledger_fd=ledger_fd)


def _needs_rebuild(ledger: Path, ledger_fd: int) -> bool:
    """A regular, non-empty ledger whose index is not one a run could use."""
    st = os.fstat(ledger_fd)
    if not st.st_size or not stat.S_ISREG(st.st_mode):
        return False
    try:
        ifd = os.open(index.index_path(ledger), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return True  # none yet
    try:
        index.read_index(ifd, ledger_fd, checkpoint_ok=True)
    except (Stale, OSError, ValueError, TypeError):
        return True
    finally:
        os.close(ifd)
    return False


def _lines(manifest: Path) -> int:
    """How many lines a regular file holds (a pipe: 0, it is read once, by the scan)."""
    if not os.path.isfile(manifest):  # not even opened: that would wake a FIFO's writer
        return 0
    try:
        fd = os.open(manifest, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return 0
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return 0
        lines = 0
        while chunk := os.read(fd, _COUNT_BYTES):
            lines += chunk.count(b"\n")
        return lines + 1
    except OSError:
        return 0
    finally:
        os.close(fd)


def _child(
    ledger: Path,
    ledger_fd: int,
    fd: int,
    folder: str,
    slots: int,
    parent: int,
    b: premark.Board | None,
) -> NoReturn:
    """The forked child: build (marking the lines the run offers, if any), seal, exit 0;
    on anything else exit 1, silently."""
    code = 1
    joiner = None
    try:
        if b is not None:
            close_quietly(b.write_fd)  # the run's end: the pipe ends when the run does
            b.write_fd = -1
            joiner = premark.Joiner(b)
        # A rebuild makes two short-lived tuples per record and no cycles: the collector's
        # passes over them were 6 % of its time (measured), and the child ends by _exit.
        gc.disable()
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # its file has no name: dying is clean
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        quiet = os.open(os.devnull, os.O_WRONLY)  # the run says what went wrong, once
        os.dup2(quiet, 1)
        os.dup2(quiet, 2)
        table = Table(
            fd,
            slots=slots,
            used=0,
            codes=[],
            ledger_fd=None,
            writable=True,
            tmp_dir=folder,
        )
        state = State(path=ledger, latest=table)
        with open(os.dup(ledger_fd), "rb") as f:
            reader = Reader(ledger, f)
            fold(
                reader,
                state,
                None,
                still_wanted=lambda: os.getppid() == parent,
                on_region=joiner,
            )
        if table.slots != slots or table.in_memory:  # it grew into another file (or memory)
            raise OSError(errno.EFBIG, "the table outgrew its file")
        index.seal(table, index.covered(ledger_fd, reader.end, reader.lineno), state.trailer())
        if b is not None:
            b.covered(reader.end)
        code = 0
    finally:
        if joiner is not None:
            joiner.finish()
        os._exit(code)
