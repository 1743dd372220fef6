"""The plan of a large `run` looked ahead by a second process: which lines the ledger already
records as done, found in every other block of BLOCK lines while this process plans the
blocks between.

Why. A rerun of 10^6 lines that are all done looks every line's Name up in the index
(about 4.5 µs each: a hash, a read, the slot's keyed check) before it can end: 5 s of one
core while the other idles; a resume looks up every done line before its first request.
So `looked_ahead` forks a helper that reads the spool in the same order and looks up the
lines of the odd blocks, marking each one the plan would skip as done (a byte a line, in
memory shared with this process); this process looks up the lines of the even blocks as
always and skips a marked line without a lookup. Blocks, not halves: the lines done are
often the first ones (a resume), and both processes then share them. A line not marked
(not done, not reached yet, the helper failed or was not started, a slot failed its check)
is planned as always: the plan never waits for the helper. The helper stays ahead: it
passes a line of an even block in ~0.8 µs and looks one up in ~4.5 µs, where the plan
takes ~5 µs and ~1 µs.

Why a mark stays true. A line is marked when the ledger's latest word on its Name is done
with the fingerprint the line has now (run_plan.decide_on says "done"). Until the plan
reaches that line, this run writes only records of the lines before it: not that Name's
(a Name given twice makes the later line invalid), or an invalid line's, which never hides
what was sent for its Name. Nothing else writes the ledger: the run holds its lock.

When not: a short manifest (the lookups cost less than the fork), a table in memory (no
file to read it from), another thread (a forked child could find a lock held forever).
The helper writes only the shared marks, never the ledger, the index or a log line; it
exits when its parent is gone (within a block: until then the ledger's `flock`, whose open
file it shares, stays held), and is killed and reaped when the plan ends first.
"""

from __future__ import annotations

import contextlib
import gc
import mmap
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, NoReturn

from worker.ledger.layout import BadSlot
from worker.ledger.table import Table
from worker.manifest import spool
from worker.manifest.values import Invalid, Scan
from worker.plan.run_plan import DONE_DECISION, decide_on

# Below this many lines the plan takes under half a second: not worth a process.
MIN_LINES = 100_000  # not Final: the tests lower it (tests/hooks)
# Lines a block: item k is the helper's when (k // BLOCK) is odd (`helps`). Not Final: the
# tests lower it (tests/hooks).
BLOCK = 4096
_ASK_PARENT_EVERY: Final = 4096


def helps(k: int) -> bool:
    """Whether item k of the spool (from 0) is one the helper looks up."""
    return bool(k // BLOCK & 1)


@dataclass(slots=True)
class Ahead:
    """A helper marking each item of its blocks (`helps`) the plan skips as done:
    `marks[k]` is 1 for item k once the helper has found it done. A mark is true from the
    moment it is written (module docstring): the plan reads them as they come, never waits
    for them, and looks an unmarked line up itself."""

    pid: int
    marks: mmap.mmap

    def cancel(self) -> None:
        """Stop the helper if it still runs, reap it, let the marks go. Idempotent."""
        pid, self.pid = self.pid, 0
        if pid <= 0:
            return
        self.marks.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while True:
            try:
                os.waitpid(pid, 0)
            except InterruptedError:
                continue
            except ChildProcessError:
                pass
            return


@contextlib.contextmanager
def looked_ahead(scan: Scan, table: object, retry_rejected: bool) -> Iterator[Ahead | None]:
    """A helper looking up its blocks of `scan`'s spool in `table` (module docstring), or
    None when there is none; stopped at the end, whatever happens."""
    ahead = start(scan, table, retry_rejected)
    try:
        yield ahead
    finally:
        if ahead is not None:
            ahead.cancel()


def start(scan: Scan, table: object, retry_rejected: bool) -> Ahead | None:
    """The helper, forked, or None where it cannot help or could hang (module docstring).
    `table` is the ledger's latest word per Name (an index table in a file, to help)."""
    lines = scan.groups + scan.invalid
    if lines < MIN_LINES or not isinstance(table, Table) or table.in_memory:
        return None
    if threading.active_count() > 1 or not hasattr(os, "fork"):
        return None
    marks = mmap.mmap(-1, lines)  # shared and anonymous: zero, "not known"
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        marks.close()
        return None
    if pid == 0:
        _helper(scan, table, retry_rejected, marks, parent)
    return Ahead(pid=pid, marks=marks)


def _helper(
    scan: Scan, table: Table, retry_rejected: bool, marks: mmap.mmap, parent: int
) -> NoReturn:
    """The forked helper: mark, and exit (1 on anything unforeseen, silently: a mark
    already written stays true, the rest the plan looks up)."""
    code = 1
    try:
        gc.disable()  # short-lived objects, no cycles, and an _exit at the end (prebuild.py)
        signal.set_wakeup_fd(-1)  # the parent's event loop is not ours to wake
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, 1)
        os.dup2(quiet, 2)
        peek, size = table.peek, len(marks)
        for k, item in enumerate(spool.read_lazily(scan)):
            if k % _ASK_PARENT_EVERY == 0 and os.getppid() != parent:
                break
            if k >= size:  # more items than the scan counted: not ours to judge
                break
            if not helps(k) or isinstance(item, Invalid):
                continue
            try:
                prev = peek(item.name)
            except BadSlot:
                continue  # the plan looks it up itself, and rebuilds the index
            decision = decide_on(prev, item.fingerprint, retry_rejected=retry_rejected)
            if decision is DONE_DECISION:
                marks[k] = 1
        else:
            code = 0
    finally:
        os._exit(code)
