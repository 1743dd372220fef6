"""The ledger and `report` through the real CLI: ledgers written by hand with the typed
records, locks held by real processes, FIFOs and devices as --ledger."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli_env, names, run_worker, write_manifest
from tests.test_ledger import footer, hold_lock, intent, line, result
from tests.test_report import done, groups_of, ledger_for
from worker.ledger.lock import lock_path
from worker.ledger.records import Outcome, StopReason

pytestmark = pytest.mark.slow  # real processes: `pytest -m 'not slow'` skips them


def report_json(ledger: Path, home: Path) -> dict[str, object]:
    out = run_worker("report", str(ledger), "--json", env=cli_env(home))
    assert out.returncode == 0, out.stderr
    loaded: dict[str, object] = json.loads(out.stdout)
    return loaded


def test_report_tells_a_running_run_from_a_crashed_one(tmp_path: Path) -> None:
    """A run without a footer is `running` while a process holds the ledger's lock, and
    `crashed` once that process is killed with -9 (no stale lock)."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(3))
    ledger = ledger_for(tmp_path, manifest, *done(next(iter(groups_of(manifest).values()))))
    holder = hold_lock(lock_path(ledger))
    try:
        running = report_json(ledger, tmp_path)["last_run"]
        assert isinstance(running, dict) and running["state"] == "running"
        text = run_worker("report", str(ledger), env=cli_env(tmp_path)).stdout
        assert "running (another process holds the ledger's lock)" in text
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    crashed = report_json(ledger, tmp_path)["last_run"]
    assert isinstance(crashed, dict) and crashed["state"] == "crashed"
    text = run_worker("report", str(ledger), env=cli_env(tmp_path)).stdout
    assert "did not finish (killed or crashed)" in text


def test_report_says_interrupted_and_stopped_from_the_footer(tmp_path: Path) -> None:
    """A footer stopped by a signal reads `interrupted`; one stopped by the server reads
    `stopped` with the reason, never `finished`."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(1))
    for reason, said in (
        (StopReason.SIGNAL, "interrupted by a signal (resumable)"),
        (StopReason.ABORTED, "stopped: the server refused the run"),
    ):
        ledger = ledger_for(tmp_path, manifest, footer(stopped_by=reason))
        out = run_worker("report", str(ledger), env=cli_env(tmp_path))
        assert out.returncode == 0 and f": {said}" in out.stdout, out.stdout


def test_report_failed_prints_every_line_not_done_including_never_sent(tmp_path: Path) -> None:
    """After an interrupted run, `report --failed` prints the in-doubt line and every line
    never sent, as a manifest `validate` accepts; the reasons go to stderr."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(6))
    g = list(groups_of(manifest).values())
    ledger = ledger_for(
        tmp_path,
        manifest,
        *done(g[0]),
        intent(g[1].name, g[1].fingerprint, 2),
        footer(stopped_by=StopReason.SIGNAL),
    )
    env = cli_env(tmp_path)
    out = run_worker("report", str(ledger), "--failed", env=env)
    assert out.returncode == 0, out.stderr
    assert [json.loads(x)["Name"] for x in out.stdout.splitlines()] == [x.name for x in g[1:]]
    assert f"m.jsonl:2: {g[1].name}: in doubt" in out.stderr
    assert f"m.jsonl:6: {g[5].name}: pending: never sent" in out.stderr
    again = tmp_path / "again.jsonl"
    again.write_text(out.stdout, encoding="utf-8")
    assert run_worker("validate", str(again), env=env).returncode == 0
    as_json = run_worker("report", str(ledger), "--failed", "--json", env=env)
    rows = [json.loads(x) for x in as_json.stdout.splitlines()]
    assert [(r["line"], r["status"]) for r in rows] == [
        (2, "in_doubt"),
        (3, "pending"),
        (4, "pending"),
        (5, "pending"),
        (6, "pending"),
    ]


def test_report_on_a_record_with_wrong_types_names_file_line_field(tmp_path: Path) -> None:
    """Valid JSON with a wrong type: exit 2 and FILE:LINE: field, never a traceback."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(1))
    g = next(iter(groups_of(manifest).values()))
    ledger = ledger_for(tmp_path, manifest, intent(g.name, g.fingerprint))
    bad = json.loads(line(result(g.name, Outcome.CREATED, g.fingerprint)))
    bad["status"] = "OK"
    with ledger.open("a", encoding="utf-8") as f:
        f.write(json.dumps(bad) + "\n")
    out = run_worker("report", str(ledger), env=cli_env(tmp_path))
    assert out.returncode == 2
    assert f"{ledger}:3: damaged ledger record: field status must be an integer" in out.stderr
    assert "Traceback" not in out.stderr


def test_dev_null_and_a_fifo_are_refused_as_ledger_without_hanging(tmp_path: Path) -> None:
    """`--ledger /dev/null` or a FIFO: exit 2 naming what it is, for a run and a dry run;
    nothing waits on the FIFO and nothing is created in /dev."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(1))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    env = cli_env(tmp_path)
    for ledger, kind in (("/dev/null", "a character device"), (str(fifo), "a FIFO")):
        for extra in ((), ("--dry-run",)):
            out = run_worker(
                "run", str(manifest), "--sandbox", "--ledger", ledger, *extra, env=env, timeout=60
            )
            assert out.returncode == 2, out.stderr
            assert f"{ledger}: is {kind}" in out.stderr
    assert not Path("/dev/null.lock").exists()


def test_a_one_line_config_file_given_as_ledger_is_left_untouched(tmp_path: Path) -> None:
    """A mistyped --ledger naming a one-line file without a final newline is refused (exit 2)
    and not truncated; no lock file is left beside it."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(1))
    config = tmp_path / "worker.conf"
    config.write_bytes(b"endpoint = https://live.volcengineapi.com")
    out = run_worker(
        "run", str(manifest), "--sandbox", "--ledger", str(config), env=cli_env(tmp_path)
    )
    assert out.returncode == 2 and "is not a worker ledger" in out.stderr
    assert config.read_bytes() == b"endpoint = https://live.volcengineapi.com"
    assert not lock_path(config).exists()


def test_report_after_sync_says_in_sync_and_names_the_pruned(
    tmp_path: Path, sandbox_factory: Any
) -> None:
    """Through the CLI against a preloaded sandbox: a sync that found all 12 groups in sync
    reports them `in_sync` (none pending, --failed lists none); after a prune of 4, the
    report counts delete/deleted 4 by action and names the deleted groups."""
    rows = names(12)
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    sb = sandbox_factory("--preload", str(manifest))
    env = cli_env(tmp_path)
    ledger = tmp_path / "fresh.ledger.jsonl"
    synced = run_worker(
        "sync", str(manifest), "--endpoint", sb.url, "--ledger", str(ledger), env=env
    )
    assert synced.returncode == 0, synced.stderr
    got = report_json(ledger, tmp_path)
    assert (got["total"], got["in_sync"], got["pending"], got["not_done"]) == (12, 12, 0, 0)
    failed = run_worker("report", str(ledger), "--failed", env=env)
    assert failed.returncode == 0 and failed.stdout == "", failed.stderr
    kept = write_manifest(tmp_path / "kept.jsonl", rows[:8])
    pruned = run_worker(
        "sync",
        str(kept),
        "--endpoint",
        sb.url,
        "--ledger",
        str(ledger),
        "--prune",
        "--scope-match",
        "组.*",
        env=env,
    )
    assert pruned.returncode == 0, pruned.stderr
    got = report_json(ledger, tmp_path)
    assert (got["total"], got["in_sync"], got["pending"]) == (8, 8, 0)
    assert got["actions"] == {"delete/deleted": 4}
    deletes = got["deletes"]
    assert isinstance(deletes, dict) and deletes["total"] == 4
    assert sorted(deletes["names"]) == [r["Name"] for r in rows[8:]]  # sent concurrently
    text = run_worker("report", str(ledger), env=env).stdout
    assert ["delete/deleted", "4"] in [x.split() for x in text.splitlines()]
    assert "deleted (4): " in text and "in sync" in text
