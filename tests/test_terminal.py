"""What a person sees: the real CLI with its stderr on a pseudo-terminal, against the sandbox.

At the default verbosity a terminal shows the bar, one line per phase and the summary, no
line per group (`-v` shows them); the bar and the JSON progress line count this run's work
only, at a rate that never exceeds --rate; --log-file takes the JSON log while the terminal
keeps its bar; off a terminal the output is JSON lines, as it always was.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import struct
import subprocess
import termios
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SandboxProc, cli_env, names, run_worker, worker_cmd, write_manifest

pytestmark = pytest.mark.slow  # real processes

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
RATE_SHOWN = re.compile(r"(\d+(?:\.\d+)?) req/s")


def on_pty(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """Run the worker with stderr on a pseudo-terminal (160 columns); its exit code and
    what the terminal received, without colours."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    proc = subprocess.Popen(
        worker_cmd(*args),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=slave,
    )
    os.close(slave)
    chunks: list[bytes] = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=120)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, ANSI.sub("", b"".join(chunks).decode("utf-8", errors="replace"))


def run_args(manifest: Path, sandbox: SandboxProc, *more: str) -> tuple[str, ...]:
    return ("run", str(manifest), "--endpoint", sandbox.url, *more)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_default_terminal_shows_bar_phases_and_summary_not_groups(
    sandbox: SandboxProc, tmp_path: Path
) -> None:
    """Default verbosity on a terminal: the validate and apply phase lines, the bar at
    12/12, the summary; not one `group.*` line."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(12))
    code, seen = on_pty(*run_args(manifest, sandbox, "--rate", "20"), env=cli_env(tmp_path))
    assert code == 0, seen
    for phase in ("manifest.validated", "run.start", "run.summary"):
        assert phase in seen, seen
    assert "12/12" in seen and "create/created=12" in seen
    assert "group." not in seen
    assert seen.index("12/12") < seen.index("run.summary")  # the bar ends before the summary


def test_sync_terminal_shows_list_plan_and_check_phases(
    sandbox: SandboxProc, tmp_path: Path
) -> None:
    """`sync` on a terminal: a line for the listing, the plan and the check that follows
    the writes; no per-group line."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(8))
    code, seen = on_pty(
        "sync", str(manifest), "--endpoint", sandbox.url, "--rate", "20", env=cli_env(tmp_path)
    )
    assert code == 0, seen
    for phase in ("manifest.validated", "sync.listed", "sync.plan", "sync.round", "run.summary"):
        assert phase in seen, seen
    assert "8/8" in seen and "group." not in seen


def test_verbose_terminal_shows_a_line_per_group(sandbox: SandboxProc, tmp_path: Path) -> None:
    """`-v` on a terminal: one `group.created` line per group, with the bar."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(6))
    code, seen = on_pty(*run_args(manifest, sandbox, "--rate", "20", "-v"), env=cli_env(tmp_path))
    assert code == 0, seen
    assert seen.count("group.created") == 6
    assert "6/6" in seen


def test_rejected_groups_show_a_few_then_say_where_the_rest_are(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """Failed groups at the default verbosity: the first 10 warnings, then one line that
    says -v and `worker report --failed` show the rest."""
    sb: SandboxProc = sandbox_factory("--rate", "50", "--forbid", "^禁止")
    manifest = write_manifest(tmp_path / "m.jsonl", names(14, prefix="禁止"))
    env = cli_env(tmp_path)
    code, seen = on_pty(*run_args(manifest, sb, "--rate", "50"), env=env)
    assert code == 1, seen
    assert seen.count("group.rejected") == 10
    assert seen.count("group.more_not_shown") == 1 and "--failed" in seen


def thirty_done_then(
    sandbox_factory: Any, tmp_path: Path, more: int
) -> tuple[SandboxProc, Path, dict[str, str]]:
    """A manifest of 30 lines carried out, then `more` new lines added to it. The sandbox
    allows 50/s: no throttle (and its seconds of pause), so only the worker's own pacing
    bounds the rate a rerun shows."""
    sandbox: SandboxProc = sandbox_factory("--rate", "50")
    manifest = tmp_path / "m.jsonl"
    env = cli_env(tmp_path)
    write_manifest(manifest, names(30))
    first = run_worker(*run_args(manifest, sandbox, "--rate", "50"), env=env)
    assert first.returncode == 0, first.stderr
    write_manifest(manifest, names(30) + names(more, prefix="新"))
    return sandbox, manifest, env


def test_resumed_run_counts_only_its_own_work(sandbox_factory: Any, tmp_path: Path) -> None:
    """A rerun over 30 done lines and 15 new ones: the bar ends at 15/15 with the 30 shown
    as skipped, and every rate it showed is at most --rate."""
    sandbox, manifest, env = thirty_done_then(sandbox_factory, tmp_path, 15)
    code, seen = on_pty(*run_args(manifest, sandbox, "--rate", "10"), env=env)
    assert code == 0, seen
    assert "15/15" in seen and "30 skipped" in seen
    assert "45/45" not in seen
    rates = [float(r) for r in RATE_SHOWN.findall(seen)]
    assert rates and max(rates) <= 10.0, rates


def test_json_progress_line_counts_only_this_runs_work(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """Off a terminal, the `run.progress` lines of a rerun count its new lines only, skips
    apart, and rate_per_s never exceeds --rate."""
    sandbox, manifest, env = thirty_done_then(sandbox_factory, tmp_path, 20)
    env["TESTHOOK_PROGRESS_EVERY_S"] = "0.5"
    out = run_worker(*run_args(manifest, sandbox, "--rate", "10"), env=env)
    assert out.returncode == 0, out.stderr
    lines = [e for e in json_lines(out.stderr) if e["event"] == "run.progress"]
    assert lines, out.stderr
    for line in lines:
        assert line["done"] <= line["total"] <= 50
        assert line["rate_per_s"] is None or line["rate_per_s"] <= 10.0
    last = lines[-1]
    assert last["skipped"] == 30 and last["total"] == 20


def test_log_file_gets_the_json_log_while_the_terminal_keeps_the_bar(
    sandbox: SandboxProc, tmp_path: Path
) -> None:
    """--log-file: every event as a JSON line (one per group), created 0600; the terminal
    shows the bar and the phases, no JSON and no per-group line. A second run appends."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(12))
    log_file = tmp_path / "run.log"
    env = cli_env(tmp_path)
    code, seen = on_pty(
        *run_args(manifest, sandbox, "--rate", "20", "--log-file", str(log_file)), env=env
    )
    assert code == 0, seen
    assert "12/12" in seen and "run.start" in seen
    assert "group." not in seen and '{"' not in seen
    events = json_lines(log_file.read_text(encoding="utf-8"))
    assert [e["event"] for e in events].count("group.created") == 12
    assert {"manifest.validated", "run.start", "run.summary"} <= {e["event"] for e in events}
    assert log_file.stat().st_mode & 0o777 == 0o600
    again = run_worker(*run_args(manifest, sandbox, "--log-file", str(log_file)), env=env)
    assert again.returncode == 0, again.stderr
    appended = json_lines(log_file.read_text(encoding="utf-8"))
    assert appended[: len(events)] == events and len(appended) > len(events)


def test_log_file_from_a_job_file(sandbox: SandboxProc, tmp_path: Path) -> None:
    """`log-file` in a job file (a cron job's), relative to the job file."""
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    write_manifest(jobs / "m.jsonl", names(3))
    job = jobs / "nightly.toml"
    job.write_text(
        f'command = "run"\nmanifest = "m.jsonl"\nendpoint = "{sandbox.url}"\n'
        'log-file = "nightly.log"\n',
        encoding="utf-8",
    )
    out = run_worker("run", "--job", str(job), "-q", env=cli_env(tmp_path))
    assert out.returncode == 0, out.stderr
    events = json_lines((jobs / "nightly.log").read_text(encoding="utf-8"))
    assert [e["event"] for e in events].count("group.created") == 3


def test_off_a_terminal_the_output_is_json_lines(sandbox: SandboxProc, tmp_path: Path) -> None:
    """stderr on a pipe: JSON lines only, one per group as before, no bar."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(5))
    out = run_worker(*run_args(manifest, sandbox, "--rate", "20"), env=cli_env(tmp_path))
    assert out.returncode == 0, out.stderr
    events = json_lines(out.stderr)  # every line parses
    assert [e["event"] for e in events].count("group.created") == 5
    assert "%|" not in out.stderr


@pytest.mark.parametrize(
    "which", ["ledger", "lock", "index", "spool", "manifest", "folder", "long"]
)
def test_log_file_that_would_harm_the_run_is_refused(
    sandbox: SandboxProc, tmp_path: Path, which: str
) -> None:
    """--log-file naming the ledger, a file kept beside it, the manifest, a folder or a path
    too long for the file system: exit 2 naming --log-file, nothing sent, no traceback."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(2))
    ledger = tmp_path / "m.ledger.jsonl"
    target = {
        "ledger": ledger,
        "lock": Path(f"{ledger}.lock"),
        "index": Path(f"{ledger}.index"),
        "spool": Path(f"{ledger}.spool"),
        "manifest": manifest,
        "folder": tmp_path,
        "long": tmp_path / ("x" * 300) / "run.log",
    }[which]
    out = run_worker(*run_args(manifest, sandbox, "--log-file", str(target)), env=cli_env(tmp_path))
    assert out.returncode == 2, out.stderr
    assert "--log-file" in out.stderr and "Traceback" not in out.stderr
    assert sandbox.creates() == []


def test_log_file_through_a_symbolic_link_is_refused(sandbox: SandboxProc, tmp_path: Path) -> None:
    """A symbolic link where the log goes is refused (exit 2): the file it points to is
    left as it was."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(2))
    victim = tmp_path / "precious.txt"
    victim.write_text("keep\n", encoding="utf-8")
    link = tmp_path / "run.log"
    link.symlink_to(victim)
    out = run_worker(*run_args(manifest, sandbox, "--log-file", str(link)), env=cli_env(tmp_path))
    assert out.returncode == 2, out.stderr
    assert "--log-file" in out.stderr and "symbolic link" in out.stderr
    assert victim.read_text(encoding="utf-8") == "keep\n"
