"""What `report` reads before its pure core runs: the ledger's state, whether a process holds
its lock, which manifest to count against (and why), the sync audit, recorded bodies."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from worker.errors import ManifestError, UsageError
from worker.ledger.load import read_state, records_of
from worker.ledger.lock import probe_lock
from worker.ledger.records import Intent, Result
from worker.ledger.state import State
from worker.manifest import source, spool
from worker.manifest.remembered import digest, recall, remembered_path
from worker.manifest.values import Group, Invalid, Scan
from worker.report.sync_audit import Audit, audit_of, has_sync


@dataclass(slots=True, kw_only=True)
class Gathered:
    """What `report` reads before the pure core runs. A context manager: it may hold the
    manifest's scan open."""

    ledger: Path
    state: State
    locked: bool | None  # a process holds the ledger's lock now (None: cannot tell)
    scan: Scan | None  # the manifest counted against, if any
    note: str  # which manifest and why, or why none
    audit: Audit | None = None  # only for a ledger holding a sync

    def items(self) -> Iterator[Group | Invalid] | None:
        return spool.read(self.scan) if self.scan is not None else None

    def close(self) -> None:
        if self.scan is not None:
            with contextlib.suppress(AttributeError):  # a Scan without a spool has no close
                self.scan.close()

    def __enter__(self) -> Gathered:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def gather(ledger: Path, *, manifest: Path | None = None, state: State | None = None) -> Gathered:
    """Read the ledger (unless `state` is given), probe its lock, choose the manifest."""
    if state is None:
        if not os.path.lexists(ledger):
            raise UsageError(f"{ledger}: no such ledger")
        state = read_state(ledger)
    locked = probe_lock(ledger)
    got = _choose(ledger, state, locked, manifest)
    if has_sync(state):
        try:
            got.audit = audit_of(state, records_of(ledger))
        except BaseException:
            got.close()
            raise
        header = state.header
        if (
            got.scan is not None
            and header is not None
            and got.scan.sha256 != header.manifest_sha256
        ):
            got.audit = got.audit.unchecked()
    return got


def _choose(ledger: Path, state: State, locked: bool | None, manifest: Path | None) -> Gathered:
    """The manifest to count against, and why."""
    header = state.header
    remembered = remembered_path(ledger)

    def counted(scan: Scan | None, note: str) -> Gathered:
        return Gathered(ledger=ledger, state=state, locked=locked, scan=scan, note=note)

    if manifest is not None:
        # The user named it: its problems are errors. A run's validation of the very same
        # bytes, kept beside the ledger, is as good as a new one (manifest.recall).
        scan = recall(manifest, remembered) or source.scan(manifest)
        note = f"counted against {manifest} (--manifest)"
        if header is not None and scan.sha256 != header.manifest_sha256:
            note += "; it is not the manifest the last run used"
        return counted(scan, note)
    if header is None:
        return counted(None, "the ledger records no run yet")
    path = Path(header.manifest)
    every = (
        "the counts cover every Name the ledger has recorded (pass --manifest to count "
        "against a manifest)"
    )
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        regular = False
    if not regular:  # never read a pipe or /dev/stdin named by an old header
        return counted(None, f"the last run's manifest {path} is not a file here; {every}")
    changed = f"the last run's manifest {path} has changed since; {every}"
    # Hashed before it is validated: a manifest that changed since is not counted against,
    # so validating it (seconds for millions of lines) would be wasted.
    sha256 = digest(path)
    if sha256 is not None and sha256 != header.manifest_sha256:
        return counted(None, changed)
    last: Scan | None = None
    if sha256 is not None:
        with contextlib.suppress(ManifestError):
            last = recall(path, remembered) or source.scan(path)
    if last is None:
        return counted(None, f"the last run's manifest {path} cannot be read; {every}")
    if last.sha256 != header.manifest_sha256:  # changed between the hash and the scan
        last.close()
        return counted(None, changed)
    return counted(last, f"counted against {path}, the last run's manifest (unchanged)")


def recorded_bodies(path: Path, names: set[str]) -> dict[str, bytes]:
    """The last body the ledger recorded for each of `names` (a second, streaming pass: the
    ledger state keeps no bodies)."""
    bodies: dict[str, bytes] = {}
    if not names:
        return bodies
    for record in records_of(path):
        if isinstance(record, Intent | Result) and record.name in names and record.body is not None:
            bodies[record.name] = orjson.dumps(record.body)
    return bodies
