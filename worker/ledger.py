"""Ledger step: the append-only JSONL record of every run, and what it says is done.

Records (one JSON object per line, `type` first):
  run     header: run_id, started, version, manifest path and sha256, settings (no secrets)
  intent  written before each attempt is sent: name, line, fingerprint, attempt, body
  result  one per finished item: name, outcome, status, code, message, request_id, attempts,
          fingerprint, line, started, finished (+ body for items not done)
  end     footer: the run's summary and exit code

Writes are synchronous `os.write` calls of whole records on an O_APPEND descriptor: nothing
can be scheduled between deciding an outcome and recording it, and a crash can tear only the
last line. `open` cuts such a torn tail off; damage anywhere else is an error naming the line.
An exclusive `flock` on the file keeps a second run out; the kernel drops it when a process
dies, so a killed run leaves no stale lock.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson

from worker.errors import LedgerError, LedgerLocked

OUTCOMES: Final = ("created", "exists", "rejected", "deferred", "invalid")
DONE: Final = frozenset({"created", "exists"})
FSYNC_EVERY_S: Final = 1.0


def default_path(manifest: Path) -> Path:
    """groups.jsonl -> groups.ledger.jsonl, beside the manifest."""
    stem = manifest.name[: -len(".jsonl")] if manifest.name.endswith(".jsonl") else manifest.name
    return manifest.with_name(f"{stem}.ledger.jsonl")


@dataclass(slots=True)
class Latest:
    """The ledger's latest word on one Name, kept small: a run holds one per group."""

    in_doubt: bool  # an intent with no result after it: sent, answer never recorded
    outcome: str | None  # None when in doubt
    fingerprint: str | None
    code: str
    line: int
    body: dict[str, Any] | None  # only for items not done (report --failed rebuilds them)

    @classmethod
    def of(cls, record: dict[str, Any]) -> Latest:
        in_doubt = record["type"] == "intent"
        outcome = None if in_doubt else record.get("outcome")
        return cls(in_doubt=in_doubt, outcome=outcome, fingerprint=record.get("fingerprint"),
                   code=record.get("code") or "", line=record.get("line") or 0,
                   body=None if outcome in DONE else record.get("body"))

    @property
    def done(self) -> bool:
        return self.outcome in DONE


@dataclass(slots=True)
class State:
    """What the ledger says about each Name: its latest result, or an intent after it."""

    latest: dict[str, Latest] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)  # headers, oldest first
    invalid: list[dict[str, Any]] = field(default_factory=list)  # invalid results of the last run
    footer: dict[str, Any] | None = None

    @property
    def unnamed_invalid(self) -> int:
        """Invalid lines of the last run that had no usable Name (so are not in `latest`)."""
        return sum(1 for r in self.invalid if not isinstance(r.get("name"), str))

    def fold(self, record: dict[str, Any]) -> None:
        kind = record.get("type")
        if kind == "run":
            self.runs.append(record)
            self.invalid = []
            self.footer = None
        elif kind == "end":
            self.footer = record
        elif kind in ("intent", "result"):
            name = record.get("name")
            if kind == "result" and record.get("outcome") == "invalid":
                self.invalid.append(record)
            if not isinstance(name, str):
                return
            prev = self.latest.get(name)
            # Once done, a Name stays done: an intent or an invalid line after it changes
            # nothing (the planner never resends a done item; an invalid line is its own fact).
            if prev is not None and prev.done:
                return
            self.latest[name] = Latest.of(record)


def read_state(path: Path) -> State:
    """Load without locking or repairing (dry runs and reports). A torn tail is ignored."""
    state = State()
    if not path.exists():
        return state
    try:
        with path.open("rb") as f:
            for record in _records(path, f):
                state.fold(record)
    except OSError as exc:
        raise LedgerError(f"{path}: cannot read the ledger: {exc.strerror}") from None
    return state


class Ledger:
    """An open, locked ledger that the run appends to."""

    def __init__(self, path: Path, fd: int, state: State, *, torn_writes_s: float = 0.0) -> None:
        self.path = path
        self.state = state
        self._fd = fd
        self._dirty = False
        # Test hook (WORKER_TEST_TORN_WRITES_S): write each record in two halves with this
        # pause between, so that a kill -9 can land inside a record, as a crash can.
        self._torn_writes_s = torn_writes_s
        self._broken: str | None = None

    @classmethod
    def open(cls, path: Path, *, torn_writes_s: float = 0.0) -> Ledger:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise LedgerError(
                f"{path}: cannot open the ledger for writing: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LedgerLocked(f"{path}: another run is using this ledger") from None
        try:
            state = State()
            with os.fdopen(os.dup(fd), "rb") as f:
                f.seek(0)
                for record in _records(path, f, repair_fd=fd):
                    state.fold(record)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, state, torn_writes_s=torn_writes_s)

    def append(self, record: dict[str, Any]) -> None:
        """Write one whole record now. Raises LedgerError when it cannot; after that the
        ledger refuses every write, so nothing more is sent whose outcome it could not keep."""
        if self._broken is not None:
            raise LedgerError(self._broken)
        data = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        whole = memoryview(data)
        pieces = [whole[: len(whole) // 2], whole[len(whole) // 2:]] if self._torn_writes_s \
            else [whole]
        try:
            for i, view in enumerate(pieces):
                if i:
                    time.sleep(self._torn_writes_s)
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
        except OSError as exc:
            self._broken = f"{self.path}: cannot write the ledger: {exc.strerror}"
            raise LedgerError(self._broken) from None
        self._dirty = True
        self.state.fold(record)

    def sync(self) -> None:
        """fsync if anything was written since the last one. The runner calls this from a
        worker thread every FSYNC_EVERY_S: an fsync can take tens of milliseconds, and on the
        event loop that stall would bunch up paced requests."""
        if not self._dirty:
            return
        self._dirty = False  # before the fsync: a write racing with it marks it dirty again
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self._broken = f"{self.path}: cannot sync the ledger: {exc.strerror}"
            raise LedgerError(self._broken) from None

    def close(self) -> None:
        try:
            if self._broken is None:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)  # also drops the lock


def _records(path: Path, f: Any, *, repair_fd: int | None = None) -> Iterator[dict[str, Any]]:
    """Parse every line. A last line without its newline is torn (a crash mid-write): cut
    it off through `repair_fd`, or, when only reading, leave it out."""
    offset = 0
    for lineno, raw in enumerate(f, start=1):
        if not raw.endswith(b"\n"):
            if repair_fd is not None:
                os.ftruncate(repair_fd, offset)
                os.fsync(repair_fd)
            return
        offset += len(raw)
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or record.get("type") not in ("run", "intent",
                                                                      "result", "end"):
            raise LedgerError(
                f"{path}:{lineno}: damaged ledger record; the ledger is not a worker ledger "
                "or was edited. Move it aside (or fix that line) and run again")
        yield record
