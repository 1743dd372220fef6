"""The plan of a large `run` looked ahead by a second process: which lines of the manifest's
tail the ledger already records as done, found while this process plans its head.

Why. A rerun of 10^6 lines that are all done looks every line's Name up in the index
(about 4.5 µs each: a hash, a read, the slot's keyed check) before it can end: 5 s of one
core while the other idles. So `looked_ahead` forks a helper that looks up the lines from
SPLIT on, in the same order, and marks each one the plan would skip as done (a byte each,
in memory shared with this process); this process plans the lines before SPLIT as always,
then takes the marks and skips a marked line without a lookup. A line not marked (not done,
not reached yet, the helper failed or was not started, a slot failed its check) is planned
as always: the plan never waits for the helper.

Why a mark stays true. A line is marked when the ledger's latest word on its Name is done
with the fingerprint the line has now (run_plan.decide_on says "done"). Until the plan
reaches that line, this run writes only records of the lines before it: not that Name's
(a Name given twice makes the later line invalid), or an invalid line's, which never hides
what was sent for its Name. Nothing else writes the ledger: the run holds its lock.

When not: a short manifest (the lookups cost less than the fork), a table in memory (no
file to read it from), another thread (a forked child could find a lock held forever).
The helper writes only the shared marks, never the ledger, the index or a log line; it
exits when its parent is gone, and is killed when the plan ends first.
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
# The share of the lines this process plans itself: a line costs it ~5 µs looked up and
# planned, ~1 µs marked; the helper ~0.8 µs to count its way past a line of the head and
# ~4.5 µs to look one of the tail up. At a half both end together, the helper a little
# ahead of the plan all along the tail (at 10^6 lines: 3.0 s against 5.5 s alone).
SPLIT: Final = 0.5
_ASK_PARENT_EVERY: Final = 4096


@dataclass(slots=True)
class Ahead:
    """A helper marking, from item `split` of the spool on, each item the plan skips as
    done: `marks[k - split]` is 1 for item k once the helper has found it done. A mark is
    true from the moment it is written (module docstring): the plan reads them as they
    come, never waits for them, and looks an unmarked line up itself."""

    split: int
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
    """A helper looking the tail of `scan`'s spool up in `table` (module docstring), or
    None when there is none; stopped at the end, whatever happens."""
    ahead = start(scan, table, retry_rejected)
    try:
        yield ahead
    finally:
        if ahead is not None:
            ahead.cancel()


def start(scan: Scan, table: object, retry_rejected: bool) -> Ahead | None:
    lines = scan.groups + scan.invalid
    if lines < MIN_LINES or not isinstance(table, Table) or table.in_memory:
        return None
    if threading.active_count() > 1 or not hasattr(os, "fork"):
        return None
    split = int(lines * SPLIT)
    marks = mmap.mmap(-1, max(1, lines - split))  # shared and anonymous: zero, "not known"
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        marks.close()
        return None
    if pid == 0:
        _helper(scan, table, retry_rejected, split, marks, parent)
    return Ahead(split=split, pid=pid, marks=marks)


def _helper(
    scan: Scan, table: Table, retry_rejected: bool, split: int, marks: mmap.mmap, parent: int
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
            if k < split or isinstance(item, Invalid):
                continue
            if k - split >= size:  # more items than the scan counted: not ours to judge
                break
            try:
                prev = peek(item.name)
            except BadSlot:
                continue  # the plan looks it up itself, and rebuilds the index
            decision = decide_on(prev, item.fingerprint, retry_rejected=retry_rejected)
            if decision is DONE_DECISION:
                marks[k - split] = 1
        else:
            code = 0
    finally:
        os._exit(code)
