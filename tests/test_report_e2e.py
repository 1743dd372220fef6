"""`worker report` after a real `worker sync` against the sandbox process: the sync's truth
(conflicts, lines found in sync, deletes of groups already gone), as text, --json, --failed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SandboxProc, cli_env, run_worker, write_manifest

pytestmark = pytest.mark.slow  # real processes


def start(sandbox_factory: Any, tmp: Path, account: list[dict[str, Any]], *args: str) -> Any:
    preload = write_manifest(tmp / "preload.jsonl", account)
    return sandbox_factory("--rate", "50", "--preload", str(preload), *args)


def sync(
    sb: SandboxProc, manifest: Path, tmp: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    return run_worker(
        "sync", str(manifest), "--endpoint", sb.url, "--rate", "50", *args, env=cli_env(tmp)
    )


def report(ledger: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    out = run_worker("report", str(ledger), *args, env=cli_env(tmp))
    assert out.returncode == 0, out.stderr
    return out


def test_report_after_a_sync_with_a_conflict(sandbox_factory: Any, tmp_path: Path) -> None:
    """A conflict is counted and listed as a conflict naming both projects (text, --json,
    --failed), never "pending" or "changed since"; the line it created and the line it
    found in sync are done."""
    sb = start(
        sandbox_factory, tmp_path, [{"Name": "Moved", "ProjectName": "other"}, {"Name": "Same"}]
    )
    manifest = write_manifest(
        tmp_path / "m.jsonl",
        [{"Name": "New1"}, {"Name": "Same"}, {"Name": "Moved", "ProjectName": "default"}],
    )
    assert sync(sb, manifest, tmp_path).returncode == 1  # a conflict needs a human
    ledger = tmp_path / "m.ledger.jsonl"
    got = json.loads(report(ledger, tmp_path, "--json").stdout)
    assert {k: got[k] for k in ("conflict", "created", "in_sync", "pending", "in_doubt")} == {
        "conflict": 1,
        "created": 1,
        "in_sync": 1,
        "pending": 0,
        "in_doubt": 0,
    }
    [clash] = got["conflicts"]
    assert (clash["line"], clash["name"]) == (3, "Moved")
    assert "project 'other'" in clash["reason"] and "says 'default'" in clash["reason"]
    text = report(ledger, tmp_path).stdout
    assert ["conflict", "1"] in [x.split() for x in text.splitlines()]
    assert "line 3: Moved: conflict (ProjectConflict): the account's group is in project" in text
    failed = report(ledger, tmp_path, "--failed")
    assert [json.loads(x)["Name"] for x in failed.stdout.splitlines()] == ["Moved"]
    assert "project 'other'" in failed.stderr and "changed since" not in failed.stderr
    rows = [
        json.loads(x) for x in report(ledger, tmp_path, "--failed", "--json").stdout.splitlines()
    ]
    assert [(r["name"], r["status"]) for r in rows] == [("Moved", "conflict")]


def test_report_after_a_finished_sync_leaves_nothing_in_doubt(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """A `run` killed mid-way leaves lines in doubt or pending; a sync that then finishes
    (exit 0) settles them: report shows every line done (created or in sync), none pending
    or in doubt, and --failed lists nothing."""
    sb = start(sandbox_factory, tmp_path, [{"Name": "Old1"}])
    manifest = write_manifest(tmp_path / "m.jsonl", [{"Name": f"G{i}"} for i in range(6)])
    ledger = tmp_path / "m.ledger.jsonl"
    # A run that wrote intents and no answers (as after kill -9), by a real run's records.
    first = run_worker(
        "run", str(manifest), "--endpoint", sb.url, "--rate", "50", env=cli_env(tmp_path)
    )
    assert first.returncode == 0, first.stderr
    kept = [json.loads(x) for x in ledger.read_text().splitlines()]
    torn = [
        r for r in kept if r["type"] != "end" and not (r["type"] == "result" and r["line"] <= 3)
    ]
    ledger.write_text("".join(json.dumps(r) + "\n" for r in torn))
    before = json.loads(report(ledger, tmp_path, "--json").stdout)
    assert before["in_doubt"] == 3  # the setup is what it claims
    out = sync(sb, manifest, tmp_path)
    assert out.returncode == 0, out.stderr
    got = json.loads(report(ledger, tmp_path, "--json").stdout)
    assert (got["in_sync"] + got["created"] + got["exists"], got["total"]) == (6, 6)
    assert (got["pending"], got["in_doubt"], got["not_done"]) == (0, 0, 0)
    text = report(ledger, tmp_path).stdout
    assert "in doubt" not in text and "sends them again" not in text
    failed = report(ledger, tmp_path, "--failed")
    assert failed.stdout == "" and "0 line(s) not done" in failed.stderr


def test_report_counts_a_delete_answered_not_found_as_already_gone(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """With List 5 s behind writes, a second pruning sync still lists the group the first
    deleted and sends its delete again: answered ResourceNotFound, it is `already gone`,
    and `deleted` counts the one real delete."""
    # The second sync must list within the lag of the first one's delete: 5 s covers its
    # interpreter's start on a busy machine.
    sb = start(
        sandbox_factory,
        tmp_path,
        [{"Name": "Keep1", "ProjectName": "scratch"}, {"Name": "Stale1", "ProjectName": "scratch"}],
        "--list-lag-ms",
        "5000",
    )
    manifest = write_manifest(tmp_path / "m.jsonl", [{"Name": "Keep1", "ProjectName": "scratch"}])
    prune = ("--prune", "--scope-project", "scratch")
    for _ in range(2):
        sync(sb, manifest, tmp_path, *prune)
    answers = [a["status"] for a in sb.of("DeletePullToPushGroup")]
    assert answers.count(200) == 1 and answers.count(404) >= 1, answers  # the lag was seen
    ledger = tmp_path / "m.ledger.jsonl"
    got = json.loads(report(ledger, tmp_path, "--json").stdout)
    assert got["deletes"] == {"total": 1, "names": ["Stale1"]}
    assert got["already_gone_deletes"]["total"] == answers.count(404)
    assert got["actions"]["delete/deleted"] == 1
    assert got["actions"]["delete/already_gone"] == answers.count(404)
    text = report(ledger, tmp_path).stdout
    assert "deleted (1): Stale1" in text
    assert "already gone (delete answered ResourceNotFound)" in text
