"""The manifest as a sending command takes it: validated (or remembered from an earlier run
against the same ledger), kept for the next run, and named in the run's header."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import structlog

from worker.errors import LedgerError, SpoolError
from worker.manifest import source
from worker.manifest.remembered import recall, remember, remembered_path
from worker.manifest.values import Scan

log = structlog.get_logger("worker")


def scan_manifest(manifest: Path, ledger: Path) -> Scan:
    """The manifest, validated: remembered from an earlier run against this ledger when its
    bytes are the same (remembered.recall), else scanned now (spool beside the ledger)."""
    remembered = remembered_path(ledger)
    recalled = recall(manifest, remembered)
    if recalled is not None:
        log.info("manifest.unchanged", manifest=str(manifest), sha256=recalled.sha256)
        return recalled
    # The spool goes beside the ledger (not a small /tmp); a dry run or a check may look at
    # a ledger in a folder it cannot write, and then uses the temporary directory.
    folder = ledger.parent
    writable = os.access(folder, os.W_OK | os.X_OK)
    scan = source.scan(manifest, spool_dir=folder if writable else None)
    # The terminal's "validate" phase line: what the run is about to work through.
    log.info("manifest.validated", manifest=str(manifest), groups=scan.groups, invalid=scan.invalid)
    return scan


def remember_manifest(scan: Scan, ledger: Path) -> None:
    """Keep the validated spool for the next run (best effort; called with the ledger's
    lock held, so two runs never write it at once)."""
    kept = remembered_path(ledger)
    if (why := remember(scan, kept)) is not None:
        # Not an error: the next run validates the manifest again, that is all.
        log.info("manifest.not_remembered", spool=str(kept), reason=why)


@contextlib.contextmanager
def before_writes() -> Iterator[None]:
    """A spool that cannot be read back before any write was sent: exit 2, not 7."""
    try:
        yield
    except SpoolError as exc:
        raise LedgerError(f"{exc}; nothing was changed") from None


def manifest_name(path: Path) -> str:
    """The manifest as the header records it: absolute for a regular file, so that `report`
    finds it from any folder; as given for a pipe (there is nothing to find again)."""
    return str(path.resolve()) if path.is_file() else str(path)
