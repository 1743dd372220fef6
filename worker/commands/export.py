"""`worker export`: the account's available groups as a manifest, sorted by Name."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import IO

import structlog

from worker import compose
from worker.commands.sync import list_account
from worker.compose import Loop, Options
from worker.errors import Exit, UsageError
from worker.export import export_lines
from worker.records import Target
from worker.runner import Controls
from worker.settings import Settings
from worker.signing import Credentials

log = structlog.get_logger("worker")


def export(
    settings: Settings,
    options: Options,
    projects: frozenset[str],
    output: Path | None,
    controls: Controls,
    loop: Loop,
    out: IO[str],
) -> Exit:
    """`worker export`: the account's available groups as a manifest, sorted by Name."""
    if output is not None and output.exists() and not output.is_file():
        raise UsageError(f"-o {output}: not a regular file")
    settings, creds, source = compose.load_credentials(settings, options)
    log.info("export.start", credentials=source)
    target = compose.target_of(settings, creds, options)
    return loop(
        _export(settings, options, projects, output, creds, target, controls, out), controls
    )


async def _export(
    settings: Settings,
    options: Options,
    projects: frozenset[str],
    output: Path | None,
    creds: Credentials | None,
    target: Target,
    controls: Controls,
    out: IO[str],
) -> Exit:
    async with (
        compose.account_for(settings, creds, target, options) as account,
        compose.runner_for(
            account, book=None, controls=controls, run_id=uuid.uuid4().hex
        ) as runner,
    ):
        groups = await list_account(runner)
    lines = export_lines(groups.values(), projects or None)
    if output is None:
        out.flush()
        out.buffer.write(b"".join(lines))  # type: ignore[attr-defined]
        out.flush()
    else:
        _write_atomically(output, lines)
    log.info("export.done", groups=len(lines), output=str(output) if output else "stdout")
    return Exit.OK


def _write_atomically(path: Path, lines: list[bytes]) -> None:
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
