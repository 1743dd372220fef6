"""`run` never exits 0 over a line it cannot make true: a group created earlier whose line
has changed since is drift (exit 6), pointed at `worker sync`, through the real CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SandboxProc, cli_env, names, run_worker, write_manifest

pytestmark = pytest.mark.slow  # real processes


def retagged(groups: list[dict[str, Any]], index: int) -> list[dict[str, Any]]:
    """`groups` with the tags of one line changed."""
    changed = [dict(g) for g in groups]
    changed[index]["Tags"] = [{"Key": "批次", "Value": "changed", "Category": "Custom"}]
    return changed


def test_run_after_a_tag_change_exits_6_and_names_sync(
    sandbox: SandboxProc, tmp_path: Path
) -> None:
    """First run creates; after a line's tags change, `run` and `run --dry-run` exit 6 and
    say `worker sync`; `sync` makes it true, and `run` is 0 again."""
    groups = names(3)
    manifest = write_manifest(tmp_path / "m.jsonl", groups)
    env = cli_env(tmp_path)
    argv = ("--endpoint", sandbox.url)
    assert run_worker("run", str(manifest), *argv, env=env).returncode == 0
    write_manifest(manifest, retagged(groups, 1))
    sent = len(sandbox.arrivals())

    again = run_worker("run", str(manifest), *argv, env=env)
    assert again.returncode == 6, again.stderr
    assert "worker sync" in again.stderr and "run.drift" in again.stderr
    dry = run_worker("run", str(manifest), *argv, "--dry-run", env=env)
    assert dry.returncode == 6, dry.stderr
    assert "1  done_changed" in dry.stdout and "worker sync" in dry.stdout + dry.stderr
    assert len(sandbox.arrivals()) == sent  # drift is skipped, never re-created

    synced = run_worker("sync", str(manifest), *argv, env=env)
    assert synced.returncode == 0, synced.stderr
    tags = sandbox.groups()[groups[1]["Name"]]["Tags"]
    assert [t["Value"] for t in tags] == ["changed"]
    # `sync` recorded `updated` with the line's fingerprint: the line is done for `run` now.
    final = run_worker("run", str(manifest), *argv, env=env)
    assert final.returncode == 0, final.stderr


def test_a_rejected_line_outranks_drift(sandbox_factory: Any, tmp_path: Path) -> None:
    """Drift and a rejected line in one run: exit 1 (fix the line first), drift still said."""
    sb: SandboxProc = sandbox_factory("--forbid", "^禁")
    groups = names(2)
    manifest = write_manifest(tmp_path / "m.jsonl", groups)
    env = cli_env(tmp_path)
    assert run_worker("run", str(manifest), "--endpoint", sb.url, env=env).returncode == 0
    write_manifest(manifest, [*retagged(groups, 0), {"Name": "禁止01", "ProjectName": "default"}])
    out = run_worker("run", str(manifest), "--endpoint", sb.url, env=env)
    assert out.returncode == 1, out.stderr
    assert "worker sync" in out.stderr
