"""`worker validate`: check a manifest; send nothing."""

from __future__ import annotations

from pathlib import Path
from typing import IO

from worker.errors import Exit, ManifestError
from worker.manifest import source
from worker.userpaths import check_path


def validate(path: Path, out: IO[str]) -> Exit:
    """Every problem of the manifest at `path` (a ManifestError), else one line of counts."""
    check_path(path, "MANIFEST")
    with source.scan(path) as scan:
        if scan.problem_count:
            raise ManifestError(scan.problems, scan.problem_count)
        print(f"{path}: {scan.groups} group(s), no problems", file=out)
    return Exit.OK
