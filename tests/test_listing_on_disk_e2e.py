"""The listing on disk through the real CLI: sync and export give the same results as
before, and leave no scratch file behind, whether they succeed or fail."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.conftest import cli_env, run_worker, write_manifest
from tests.test_sync_e2e import ACCOUNT, FAST, MANIFEST, available, start, tagset


def scratch_env(tmp: Path) -> tuple[dict[str, str], Path]:
    """The worker's environment with a temp dir of its own, to look into afterwards."""
    scratch = tmp / "scratch"
    scratch.mkdir()
    env = cli_env(tmp)
    env["TMPDIR"] = str(scratch)
    return env, scratch


def test_a_sync_over_rounds_leaves_no_listing_file(sandbox_factory: Any, tmp_path: Path) -> None:
    """A pruning sync (several listings, a view) converges and removes every listing file."""
    sb = start(sandbox_factory, tmp_path, ACCOUNT)
    manifest = write_manifest(tmp_path / "m.jsonl", MANIFEST)
    env, scratch = scratch_env(tmp_path)
    args = ("--prune", "--scope-project", "default", "--max-delete", "5")
    done = run_worker("sync", str(manifest), "--endpoint", sb.url, *FAST, *args, env=env)
    assert done.returncode == 1, done.stderr  # the project conflict needs a human, as before
    account = available(sb)
    assert set(account) == {"New", "Same", "Retag", "Moved", "Extra2"}
    assert tagset(account["Retag"]) == {("b", "2", "Custom"), ("c", "3", "System")}
    assert os.listdir(scratch) == []


def test_export_streams_sorted_and_leaves_no_file(sandbox_factory: Any, tmp_path: Path) -> None:
    """export writes every group in Name order from the store on disk, then removes it."""
    sb = start(sandbox_factory, tmp_path, ACCOUNT)
    env, scratch = scratch_env(tmp_path)
    out = tmp_path / "export.jsonl"
    done = run_worker("export", "--endpoint", sb.url, *FAST, "-o", str(out), env=env)
    assert done.returncode == 0, done.stderr
    names = [line.split('"')[3] for line in out.read_text(encoding="utf-8").splitlines()]
    assert names == sorted(g["Name"] for g in ACCOUNT)
    assert os.listdir(scratch) == []


def test_a_listing_that_fails_leaves_no_file(sandbox_factory: Any, tmp_path: Path) -> None:
    """A listing refused by the API (wrong secret) ends the command and removes its file."""
    sb = start(sandbox_factory, tmp_path, ACCOUNT)
    env, scratch = scratch_env(tmp_path)
    env["VOLC_SECRETKEY"] = "wrong"
    done = run_worker("export", "--endpoint", sb.url, *FAST, env=env)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert os.listdir(scratch) == []
