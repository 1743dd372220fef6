"""Our own failures, each carrying the data its message needs and the exit code it means.

The tree is the mapping from failure to exit code; the CLI only prints `str(exc)` and
returns `exc.exit_code`. Anything that is not a WorkerError is a bug (exit 70).

    WorkerError                                                         exit
    ├── UsageError            bad option, job file or environment          2
    ├── CredentialsError      no usable AK/SK                              2
    ├── ManifestError         one or more bad lines, or a bad file         2
    ├── PlanRefused           sync refused before any write (scope, --max-delete)  2
    ├── OutputError           stdout could not be written (a full disk)    2
    ├── LedgerError           ledger damaged, foreign, unreadable          2
    │   ├── LedgerTargetMismatch  written for another endpoint/region/AK   2
    │   ├── LedgerLocked          another run holds the ledger             5
    │   └── LedgerWriteError      cannot write it after requests went out  7
    │       └── SpoolError        cannot read the manifest's spool mid-run 7
    ├── RunAborted            the server refused the run (auth, permission, clock,
    │                         a redirect or a non-API answer)              7
    ├── EndpointUnreachable   no HTTP answer at all for a bounded time     3
    ├── ListingFailed         the account could not be listed completely   3
    ├── StillDifferent        sync's last listing still differs from the manifest  3
    ├── LimiterUnavailable    the shared rate budget stayed away           3
    └── LimiterRefused        Redis refused --limiter (database, credentials)  2

Exit 2 always means "nothing was sent". A failure after requests went out is 3 (try
again later) or 7 (a human must fix something first); either way the ledger is consistent
and the same command resumes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar, NoReturn


class Exit(enum.IntEnum):
    """The exit-code contract (docs/contract.md: *Exit codes*)."""

    OK = 0  # the account matches the manifest (every item done)
    REJECTED = 1  # some item rejected, invalid or in conflict: fix the manifest
    USAGE = 2  # nothing was sent: usage, manifest, credentials, ledger, plan refused
    RETRY_LATER = 3  # deferred items, endpoint or limiter unreachable: run again later
    INTERRUPTED = 4  # SIGINT/SIGTERM: resumable
    LOCKED = 5  # another run holds the ledger
    DRIFT = 6  # sync --check: the account does not match the manifest
    STOPPED = 7  # the server refused the run or the ledger failed mid-run: fix, then rerun
    INTERNAL = 70  # a bug (EX_SOFTWARE): the traceback is printed


class WorkerError(Exception):
    """Base of every failure the worker reports to a user without a traceback."""

    exit_code: ClassVar[Exit] = Exit.USAGE


class UsageError(WorkerError):
    pass


class CredentialsError(WorkerError):
    pass


class OutputError(WorkerError):
    """stdout could not be written (a full disk behind `> file`): what the command was asked
    for did not arrive; nothing was changed in the account."""


class PlanRefused(WorkerError):
    """sync refused its plan before any write: prune without a scope, too many deletes."""


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


class LedgerTargetMismatch(LedgerError):
    pass


class LedgerLocked(LedgerError):
    exit_code = Exit.LOCKED


class LedgerWriteError(LedgerError):
    """The ledger refused a write (full disk, I/O error) after the run had started sending."""

    exit_code = Exit.STOPPED


class SpoolError(LedgerWriteError):
    """The private copy of the manifest (`source.scan`'s spool, beside the ledger) could
    not be read while the run was going on. Like a failed ledger write it stops the run
    (exit 7, or 2 while nothing was sent: the run's journal tells which), and the same
    command resumes; the runner already stops on a LedgerWriteError wherever it is raised."""


class RunAborted(WorkerError):
    """The server answered in a way that every further request would share (auth,
    permission, clock) or that the Live API never gives (a redirect)."""

    exit_code = Exit.STOPPED

    def __init__(self, code: str, message: str, hint: str) -> None:
        self.code = code
        self.server_message = message
        self.hint = hint
        super().__init__(f"{code}: {message} ({hint})" if message else f"{code} ({hint})")


class EndpointUnreachable(WorkerError):
    exit_code = Exit.RETRY_LATER


class ListingFailed(WorkerError):
    exit_code = Exit.RETRY_LATER


class StillDifferent(WorkerError):
    """sync wrote, listed again, and after its last round the account still differs."""

    exit_code = Exit.RETRY_LATER


class LimiterUnavailable(WorkerError):
    exit_code = Exit.RETRY_LATER


class LimiterRefused(WorkerError):
    """Redis answered, and refused us (a database number out of range, bad credentials): a
    mistake in --limiter, found before anything was sent."""

    exit_code = Exit.USAGE


def raise_first(group: BaseExceptionGroup[BaseException], kind: type[WorkerError]) -> NoReturn:
    """Raise the first `kind` a TaskGroup's `group` holds as itself (the CLI maps it to its
    exit code), else the group. Call it from a plain `except BaseExceptionGroup`, never from
    `except*`: Python 3.11.2 (Debian 12's) wraps what an except* clause raises in a new
    group, which reached the CLI as an internal error (exit 70)."""
    for exc in group.exceptions:
        if isinstance(exc, kind):
            raise exc from None
    raise group
