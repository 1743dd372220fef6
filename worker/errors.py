"""Our own failures, each carrying the data a message needs. Only the CLI maps them to exits.

    WorkerError
    ├── UsageError            bad option or environment            exit 2
    ├── CredentialsError      no usable AK/SK                      exit 2
    ├── ManifestError         one or more bad lines / bad file     exit 2
    ├── LedgerError           ledger damaged or not writable       exit 2
    │   └── LedgerLocked      another run holds the ledger         exit 5
    ├── RunAborted            the server refused every request (auth, clock)  exit 2
    └── LimiterUnavailable    the shared rate budget stayed away   exit 3
"""

from __future__ import annotations

from dataclasses import dataclass


class WorkerError(Exception):
    """Base of every failure the worker reports to a user without a traceback."""


class UsageError(WorkerError):
    pass


class CredentialsError(WorkerError):
    pass


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with one manifest line: rendered as FILE:LINE: FIELD: reason."""

    path: str
    line: int  # 1-based; 0 for a problem with the whole file
    field: str
    reason: str

    def __str__(self) -> str:
        if self.line == 0:
            return f"{self.path}: {self.reason}"
        return f"{self.path}:{self.line}: {self.field}: {self.reason}"


class ManifestError(WorkerError):
    def __init__(self, problems: list[Problem], total: int) -> None:
        self.problems = problems  # capped; `total` counts them all
        self.total = total
        super().__init__(f"{total} problem(s) in the manifest")


class LedgerError(WorkerError):
    pass


class LedgerLocked(LedgerError):
    pass


class RunAborted(WorkerError):
    """The server answered in a way that every further request would share (auth, clock)."""

    def __init__(self, code: str, message: str, hint: str) -> None:
        self.code = code
        self.server_message = message
        self.hint = hint
        super().__init__(f"{code}: {message} ({hint})")


class LimiterUnavailable(WorkerError):
    pass
