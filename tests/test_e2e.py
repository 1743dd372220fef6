"""End to end: the real CLI process against the sandbox process, over loopback."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    AK,
    SandboxProc,
    cli_env,
    ledger_records,
    max_in_window,
    names,
    run_worker,
    worker_cmd,
    write_manifest,
)
from worker.ledger.journal import Ledger
from worker.ledger.records import Target

pytestmark = pytest.mark.slow  # real processes: `pytest -m 'not slow'` skips them

ROOT = Path(__file__).resolve().parent.parent


def report_json(ledger: Path, env: dict[str, str]) -> dict[str, Any]:
    out = run_worker("report", str(ledger), "--json", env=env)
    assert out.returncode == 0, out.stderr
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def test_quick_start_example_on_embedded_sandbox(tmp_path: Path) -> None:
    """The README's quick start: the example manifest on --sandbox, then a rerun that skips
    all, truthfully: the embedded sandbox kept its account beside the sandbox ledger."""
    manifest = tmp_path / "groups.jsonl"
    shutil.copy(ROOT / "jobs/examples/groups.jsonl", manifest)
    env = cli_env(tmp_path, ak="", sk="")  # no credentials needed
    first = run_worker("run", str(manifest), "--sandbox", env=env)
    assert first.returncode == 0, first.stderr
    ledger = tmp_path / "groups.sandbox.ledger.jsonl"
    assert not (tmp_path / "groups.ledger.jsonl").exists()
    results = [r for r in ledger_records(ledger) if r["type"] == "result"]
    assert len(results) == 12 and {r["outcome"] for r in results} == {"created"}
    second = run_worker("run", str(manifest), "--sandbox", env=env)
    assert second.returncode == 0, second.stderr
    assert "already created" in second.stderr
    assert len([r for r in ledger_records(ledger) if r["type"] == "result"]) == 12


@pytest.mark.serial  # a strict 50/s window at the sandbox
def test_pacing_holds_the_window_at_rate_50(sandbox_factory: Any, tmp_path: Path) -> None:
    """300 groups at --rate 50 against a strict 50/s sandbox with 20-400 ms latency:
    no FlowLimitExceeded, never more than 50 arrivals in a sliding second, all created."""
    sb: SandboxProc = sandbox_factory("--rate", "50", "--latency-ms", "20-400")
    manifest = write_manifest(tmp_path / "m.jsonl", names(300))
    out = run_worker(
        "run", str(manifest), "--endpoint", sb.url, "--rate", "50", env=cli_env(tmp_path)
    )
    assert out.returncode == 0, out.stderr
    arrivals = sb.creates()
    assert [a for a in arrivals if a["code"] == "FlowLimitExceeded"] == []
    assert max_in_window([a["t"] for a in arrivals]) <= 50
    state = sb.state()
    assert len(state["groups"]) == 300 and all(g["created"] == 1 for g in state["groups"])


def test_faults_and_ambiguous_creates_end_exactly_once(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """20% injected faults (8% ambiguous): every group created or exists, each exactly once
    at the sandbox, exit 0, and `report --json` agrees with the sandbox."""
    sb: SandboxProc = sandbox_factory(
        "--rate",
        "50",
        "--fault-rate",
        "0.12",
        "--ambiguous-rate",
        "0.08",
        "--seed",
        "11",
        "--latency-ms",
        "5-50",
        "--hang",
        "30",
    )
    manifest = write_manifest(tmp_path / "m.jsonl", names(150))
    env = cli_env(tmp_path)
    out = run_worker(
        "run", str(manifest), "--endpoint", sb.url, "--rate", "50", "--timeout", "1.5", env=env
    )
    assert out.returncode == 0, out.stderr
    state = sb.state()
    assert len(state["groups"]) == 150
    assert all(g["created"] == 1 for g in state["groups"])
    codes = Counter(a["code"] for a in sb.creates())
    assert codes["RequestLimitExceeded.Exist"] >= 1  # ambiguous creates were confirmed by Exist
    assert sum(v for k, v in codes.items() if k not in ("", "RequestLimitExceeded.Exist")) >= 20
    summary = report_json(tmp_path / "m.ledger.jsonl", env)
    assert summary["created"] + summary["exists"] == len(state["groups"]) == summary["total"]
    assert summary["exists"] == sum(1 for g in state["groups"] if g["exist_answers"])
    assert summary["pending"] == summary["rejected"] == summary["deferred"] == 0


def test_sigterm_then_rerun_creates_everything_once(sandbox_factory: Any, tmp_path: Path) -> None:
    """SIGTERM mid-run: exit 4 within the grace period; the rerun exits 0; nothing twice,
    nothing missed."""
    sb: SandboxProc = sandbox_factory("--rate", "20", "--latency-ms", "50-300")
    manifest = write_manifest(tmp_path / "m.jsonl", names(80))
    env = cli_env(tmp_path)
    proc = subprocess.Popen(
        worker_cmd("run", str(manifest), "--endpoint", sb.url, "--rate", "20", "--grace", "5"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while len(sb.state()["groups"]) < 15 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 4, err
    assert "run.stopping" in err
    partial = len(sb.state()["groups"])
    assert 15 <= partial < 80
    summary = report_json(tmp_path / "m.ledger.jsonl", env)
    assert summary["created"] == partial  # every request that went out has its answer recorded
    again = run_worker("run", str(manifest), "--endpoint", sb.url, "--rate", "20", env=env)
    assert again.returncode == 0, again.stderr
    state = sb.state()
    assert len(state["groups"]) == 80 and all(g["created"] == 1 for g in state["groups"])
    assert all(g["exist_answers"] == 0 for g in state["groups"])  # nothing was sent twice
    assert report_json(tmp_path / "m.ledger.jsonl", env)["created"] == 80


def test_forbidden_names_are_rejected_listed_and_not_resent(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """Refused names: exit 1, `report --failed` lists exactly them, a rerun resends none."""
    sb: SandboxProc = sandbox_factory("--rate", "50", "--forbid", "^禁止")
    groups = names(30) + [{"Name": f"禁止{i}", "ProjectName": "default"} for i in range(4)]
    manifest = write_manifest(tmp_path / "m.jsonl", groups)
    env = cli_env(tmp_path)
    out = run_worker("run", str(manifest), "--endpoint", sb.url, "--rate", "50", env=env)
    assert out.returncode == 1, out.stderr
    failed = run_worker("report", str(tmp_path / "m.ledger.jsonl"), "--failed", env=env)
    listed = [json.loads(line) for line in failed.stdout.splitlines()]
    assert listed == [{"Name": f"禁止{i}", "ProjectName": "default"} for i in range(4)]
    before = len(sb.creates())
    again = run_worker("run", str(manifest), "--endpoint", sb.url, "--rate", "50", env=env)
    assert again.returncode == 1  # still not all done: the manifest asks for refused groups
    assert len(sb.creates()) == before
    assert "rejected before and the line is unchanged" in again.stderr
    # the fixed-up list is a valid manifest that can be run on its own
    fixed = tmp_path / "fixed.jsonl"
    fixed.write_text(failed.stdout)
    assert run_worker("validate", str(fixed), env=env).returncode == 0


def test_invalid_manifest_sends_nothing(sandbox: SandboxProc, tmp_path: Path) -> None:
    """A manifest with bad lines: exit 2, every bad line named, zero requests at the sandbox."""
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text(
        '{"Name": "Good1"}\n{"Name": "bad-name"}\n{"Name": "Good2"}\n'
        '{"Name": "Good1"}\n{not json\n{"Name": "ok3", "Tags": [{"Key": "k"}]}\n',
        encoding="utf-8",
    )
    out = run_worker("run", str(manifest), "--endpoint", sandbox.url, env=cli_env(tmp_path))
    assert out.returncode == 2
    for line in (2, 4, 5, 6):
        assert f"{manifest}:{line}: " in out.stderr
    assert "Traceback" not in out.stderr
    assert "nothing was sent" in out.stderr
    assert sandbox.arrivals() == [] and sandbox.state()["arrivals"] == 0
    assert not (tmp_path / "bad.ledger.jsonl").exists()


def test_skip_invalid_records_and_goes_on(sandbox: SandboxProc, tmp_path: Path) -> None:
    """--skip-invalid records each bad line as `invalid`, creates the rest, exits 1."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"Name": "Good1"}\n{"Name": "bad-name"}\n[]\n{"Name": "Good2"}\n')
    env = cli_env(tmp_path)
    out = run_worker("run", str(manifest), "--endpoint", sandbox.url, "--skip-invalid", env=env)
    assert out.returncode == 1, out.stderr
    assert sorted(g["Name"] for g in sandbox.state()["groups"]) == ["Good1", "Good2"]
    summary = report_json(tmp_path / "m.ledger.jsonl", env)
    assert (summary["created"], summary["invalid"], summary["total"]) == (2, 2, 4)


def test_wrong_secret_stops_the_run(sandbox: SandboxProc, tmp_path: Path) -> None:
    """SignatureDoesNotMatch stops the run at once: exit 7 (requests went out, a human must
    fix the keys), a clear message; nothing rejected, the rest pending."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(40))
    env = cli_env(tmp_path, sk="not-the-secret")
    out = run_worker("run", str(manifest), "--endpoint", sandbox.url, "--concurrency", "2", env=env)
    assert out.returncode == 7
    assert "SignatureDoesNotMatch" in out.stderr and "secret key" in out.stderr
    assert "Traceback" not in out.stderr
    assert len(sandbox.creates()) <= 3  # stopped at the first answer, not after 40
    summary = report_json(tmp_path / "m.ledger.jsonl", env)
    assert summary["rejected"] == 0 and summary["created"] == 0
    assert summary["pending"] + summary["deferred"] == 40 and summary["deferred"] <= 3


def test_server_clock_far_off_names_the_local_clock(sandbox_factory: Any, tmp_path: Path) -> None:
    """InvalidTimestamp stops the run early with a message about the local clock."""
    sb: SandboxProc = sandbox_factory("--clock-offset", "3600")
    manifest = write_manifest(tmp_path / "m.jsonl", names(10))
    out = run_worker("run", str(manifest), "--endpoint", sb.url, env=cli_env(tmp_path))
    assert out.returncode == 7
    assert "InvalidTimestamp" in out.stderr and "local clock" in out.stderr


def test_dry_run_and_validate_send_nothing(sandbox: SandboxProc, tmp_path: Path) -> None:
    """--dry-run prints the plan against the ledger; validate checks; neither sends."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(5))
    env = cli_env(tmp_path)
    assert run_worker("run", str(manifest), "--endpoint", sandbox.url, env=env).returncode == 0
    write_manifest(manifest, names(8))
    sent = len(sandbox.creates())
    dry = run_worker("run", str(manifest), "--endpoint", sandbox.url, "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "3  new" in dry.stdout and "5  done" in dry.stdout
    ok = run_worker("validate", str(manifest), env=env)
    assert ok.returncode == 0 and "8 group(s)" in ok.stdout
    assert len(sandbox.creates()) == sent


def test_missing_credentials_is_a_clear_error(tmp_path: Path) -> None:
    """No credentials anywhere: exit 2 and a message that says where they are looked for."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(1))
    out = run_worker("run", str(manifest), env=cli_env(tmp_path, ak="", sk=""))
    assert out.returncode == 2
    assert "VOLC_ACCESSKEY" in out.stderr and "Traceback" not in out.stderr


def test_credentials_file_is_read(sandbox: SandboxProc, tmp_path: Path) -> None:
    """~/.volc/credentials (INI, [default]) works like the official SDKs'."""
    (tmp_path / ".volc").mkdir()
    (tmp_path / ".volc" / "credentials").write_text(
        f"[default]\naccess_key_id = {AK}\nsecret_access_key = {sandbox.keys[AK]}\n"
    )
    manifest = write_manifest(tmp_path / "m.jsonl", names(2))
    out = run_worker(
        "run", str(manifest), "--endpoint", sandbox.url, env=cli_env(tmp_path, ak="", sk="")
    )
    assert out.returncode == 0, out.stderr
    assert len(sandbox.state()["groups"]) == 2


def test_locked_ledger_exits_5_and_touches_nothing(sandbox: SandboxProc, tmp_path: Path) -> None:
    """While another run holds the ledger: exit 5, nothing sent, ledger bytes unchanged."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(3))
    ledger = tmp_path / "m.ledger.jsonl"
    assert run_worker("run", str(manifest), "--dry-run", env=cli_env(tmp_path)).returncode == 0
    ledger.touch()  # an empty file is adopted as a new ledger
    holder = Ledger.open(
        ledger, target=Target(endpoint=sandbox.url, region="cn-north-1", access_key=AK)
    )
    before = ledger.read_bytes()
    try:
        out = run_worker("run", str(manifest), "--endpoint", sandbox.url, env=cli_env(tmp_path))
    finally:
        holder.close()
    assert out.returncode == 5 and "another run" in out.stderr
    assert ledger.read_bytes() == before
    assert sandbox.state()["arrivals"] == 0


def test_plain_http_only_to_loopback(tmp_path: Path) -> None:
    """http:// to a non-loopback host is refused before anything happens."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(1))
    out = run_worker(
        "run", str(manifest), "--endpoint", "http://example.com", env=cli_env(tmp_path)
    )
    assert out.returncode == 2 and "only to loopback" in out.stderr


def test_report_text_and_ledger_shape(sandbox: SandboxProc, tmp_path: Path) -> None:
    """The ledger holds header, intents, results and footer; report prints counts per code."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(3))
    env = cli_env(tmp_path)
    assert run_worker("run", str(manifest), "--endpoint", sandbox.url, env=env).returncode == 0
    records = ledger_records(tmp_path / "m.ledger.jsonl")
    assert next(r["type"] for r in records) == "run" and records[-1]["type"] == "end"
    header = records[0]
    assert header["manifest_sha256"] and header["settings"]["rate"] == 10
    assert "SK" not in json.dumps(header["settings"])
    result = next(r for r in records if r["type"] == "result")
    assert {
        "action",
        "name",
        "outcome",
        "status",
        "code",
        "message",
        "request_id",
        "sends",
        "fingerprint",
        "line",
        "started",
        "finished",
    } <= set(result)
    text = run_worker("report", str(tmp_path / "m.ledger.jsonl"), env=env).stdout
    assert "created" in text and "3" in text
