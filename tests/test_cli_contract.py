"""The CLI's promises, end to end: a run that did nothing never exits 0, signals at any
moment exit 4, a closed pipe is no crash, options go before or after the command, and every
exit code means what the contract says."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import pytest

from tests.conftest import (
    SandboxProc,
    cli_env,
    ledger_records,
    names,
    run_worker,
    worker_cmd,
    write_manifest,
)
from worker import cli
from worker.errors import Exit

pytestmark = pytest.mark.slow  # real processes: `pytest -m 'not slow'` skips them


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- a ledger belongs to one target ---------------------------------------------------------


def test_a_sandbox_run_never_writes_the_real_default_ledger(tmp_path: Path) -> None:
    """`run m.jsonl --sandbox` writes m.sandbox.ledger.jsonl and keeps its account beside
    it; m.ledger.jsonl, the one a real run uses by default, is never created."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(3))
    out = run_worker("run", str(manifest), "--sandbox", env=cli_env(tmp_path, ak="", sk=""))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m.sandbox.ledger.jsonl").exists()
    assert (tmp_path / "m.sandbox.account.json").exists()
    assert not (tmp_path / "m.ledger.jsonl").exists()


def test_a_rerun_on_the_embedded_sandbox_skips_what_its_account_holds(tmp_path: Path) -> None:
    """The embedded sandbox keeps its account between runs, so the rerun's 'already
    created' is true: a sync against the same account finds every group in sync."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(4))
    env = cli_env(tmp_path, ak="", sk="")
    assert run_worker("run", str(manifest), "--sandbox", env=env).returncode == 0
    again = run_worker("run", str(manifest), "--sandbox", env=env)
    assert again.returncode == 0 and "already created" in again.stderr
    check = run_worker("sync", str(manifest), "--sandbox", "--check", env=env)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("change", ["endpoint", "region", "access_key"])
def test_a_ledger_written_for_another_target_is_refused(
    sandbox_factory: Any, tmp_path: Path, change: str
) -> None:
    """Same ledger, other endpoint / region / access key: exit 2 before any request, the
    message names both targets and the way out; the ledger is untouched."""
    first: SandboxProc = sandbox_factory(keys={"AKONE": "S1", "AKTWO": "S2"})
    manifest = write_manifest(tmp_path / "m.jsonl", names(3))
    ledger = tmp_path / "m.ledger.jsonl"
    env = cli_env(tmp_path, ak="AKONE", sk="S1")
    assert run_worker("run", str(manifest), "--endpoint", first.url, env=env).returncode == 0
    before = ledger.read_bytes()
    arrivals = len(first.arrivals())
    endpoint, args = first.url, []
    if change == "endpoint":
        second: SandboxProc = sandbox_factory(keys={"AKONE": "S1"})
        endpoint = second.url
    elif change == "region":
        args = ["--region", "cn-beijing"]
    else:
        env = cli_env(tmp_path, ak="AKTWO", sk="S2")
    out = run_worker("run", str(manifest), "--endpoint", endpoint, *args, env=env)
    assert out.returncode == 2, out.stderr
    assert "--ledger" in out.stderr
    assert (
        first.url.split("//")[1] in out.stderr
        or "cn-beijing" in out.stderr
        or "AKTWO" in out.stderr
    )
    assert ledger.read_bytes() == before
    assert len(first.arrivals()) == arrivals
    if change == "endpoint":
        assert second.arrivals() == []


# -- an endpoint that never answers ---------------------------------------------------------


def test_an_unreachable_endpoint_ends_the_run_with_exit_3(tmp_path: Path) -> None:
    """A closed port: the run does not retry every item 8 times; it stops once the endpoint
    gave no HTTP answer for the (shortened) window, exit 3, naming the endpoint and the
    cause; items sent are deferred, none rejected, and nothing claims to be created."""
    port = free_port()
    manifest = write_manifest(tmp_path / "m.jsonl", names(200))
    env = cli_env(tmp_path) | {"TESTHOOK_UNREACHABLE_S": "1"}
    started = time.monotonic()
    out = run_worker(
        "run",
        str(manifest),
        "--endpoint",
        f"http://127.0.0.1:{port}",
        "--rate",
        "50",
        env=env,
        timeout=60,
    )
    assert out.returncode == 3, out.stderr[-2000:]
    assert time.monotonic() - started < 30
    assert f"127.0.0.1:{port}" in out.stderr and "refused" in out.stderr
    results = [r for r in ledger_records(tmp_path / "m.ledger.jsonl") if r["type"] == "result"]
    assert results and {r["outcome"] for r in results} == {"deferred"}
    footer = ledger_records(tmp_path / "m.ledger.jsonl")[-1]
    assert footer["type"] == "end" and footer["stopped_by"] == "unreachable"
    assert footer["exit_code"] == 3


# -- resending rejected lines ------------------------------------------------------------


def test_retry_rejected_resends_unchanged_rejected_lines(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """A rejected line is skipped by a plain rerun (exit 1, nothing sent) and sent again with
    --retry-rejected, without editing the manifest."""
    sb: SandboxProc = sandbox_factory("--forbid", "^Forbidden")
    manifest = write_manifest(tmp_path / "m.jsonl", [{"Name": "Forbidden1"}, *names(2)])
    env = cli_env(tmp_path)
    first = run_worker("run", str(manifest), "--endpoint", sb.url, env=env)
    assert first.returncode == 1
    rerun = run_worker("run", str(manifest), "--endpoint", sb.url, env=env)
    assert rerun.returncode == 1 and len(sb.creates()) == 3
    again = run_worker("run", str(manifest), "--endpoint", sb.url, "--retry-rejected", env=env)
    assert again.returncode == 1
    assert [a["name"] for a in sb.creates()].count("Forbidden1") == 2


# -- closed pipes -------------------------------------------------------------------------


def test_a_closed_stderr_pipe_does_not_crash_the_run(sandbox: SandboxProc, tmp_path: Path) -> None:
    """`worker run … 2>&1 | head -1`: the run goes on, exits 0, and its footer says it
    finished normally; no BrokenPipeError."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(20))
    cmd = " ".join(worker_cmd("run", str(manifest), "--endpoint", sandbox.url))
    out = subprocess.run(
        ["bash", "-c", f"{cmd} 2>&1 | head -1; exit ${{PIPESTATUS[0]}}"],
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "BrokenPipe" not in out.stdout + out.stderr
    footer = ledger_records(tmp_path / "m.ledger.jsonl")[-1]
    assert footer["type"] == "end" and footer["stopped_by"] is None and footer["exit_code"] == 0
    groups = sandbox.groups()
    assert len(groups) == 20 and all(g["created"] == 1 for g in groups.values())


def test_a_closed_stdout_pipe_does_not_crash_report(sandbox: SandboxProc, tmp_path: Path) -> None:
    """`worker report --failed | head -1` with thousands of lines: exit 0, no traceback."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(3000))
    # A dry run writes nothing; an interrupted start would too. Use a run with --max-attempts
    # on a sandbox that defers everything? Simpler: every line is pending in a ledger whose
    # run never sent anything, which report --failed lists in full.
    env = cli_env(tmp_path)
    proc = subprocess.Popen(
        worker_cmd("run", str(manifest), "--endpoint", sandbox.url, "--rate", "5"),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(sandbox.creates()) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 4
    cmd = " ".join(worker_cmd("report", str(tmp_path / "m.ledger.jsonl"), "--failed"))
    out = subprocess.run(
        ["bash", "-c", f"{cmd} | head -1; exit ${{PIPESTATUS[0]}}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and out.stdout.count("\n") == 1


# -- signals at any moment ----------------------------------------------------------------


def _big_manifest(path: Path, n: int) -> Path:
    line = '{"Name":"%s","ProjectName":"default"}\n'
    with path.open("w") as f:
        f.writelines(line % f"G{i:08d}" for i in range(n))
    return path


def _open_writer(fifo: Path, proc: subprocess.Popen[str], within_s: float = 30) -> int:
    """The write end of `fifo`, once `proc` has opened it for reading (the event: the
    manifest is being read). O_NONBLOCK makes the open fail (ENXIO) until a reader exists."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the manifest was never opened: {proc.poll()}") from None
            time.sleep(0.01)
            continue
        os.set_blocking(fd, True)
        return fd


def test_sigterm_during_the_manifest_scan_exits_4(tmp_path: Path) -> None:
    """SIGTERM while a large manifest is being validated: exit 4 with a message, not 143."""
    fifo = tmp_path / "m.jsonl"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        worker_cmd(
            "run",
            str(fifo),
            "--ledger",
            str(tmp_path / "m.ledger.jsonl"),
            "--endpoint",
            "http://127.0.0.1:9",
        ),
        env=cli_env(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    fd = _open_writer(fifo, proc)
    try:
        # A blocking write returns once the scan has taken all but a pipe's worth of it: the
        # scan is under way, and waits for more while the write end stays open.
        line = '{"Name":"%s","ProjectName":"default"}\n'
        os.write(fd, "".join(line % f"G{i:08d}" for i in range(50_000)).encode())
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        os.close(fd)
    assert proc.returncode == 4, err[-2000:]
    assert "nothing was changed" in err and "Traceback" not in err


def _read_until(stream: IO[str], needle: str, within_s: float) -> str:
    """What `stream` says until it has said `needle` (the event waited for); fails if the
    stream ends or `within_s` passes first. Reads the file descriptor itself, so nothing
    waits in Python's buffer for a later communicate() to miss."""
    seen = b""
    deadline = time.monotonic() + within_s
    while needle.encode() not in seen:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([stream], [], [], max(0.0, left))
        chunk = os.read(stream.fileno(), 65536) if ready else b""
        if not chunk:  # silent until the deadline, or the process closed its stderr
            raise AssertionError(f"no {needle!r}; stderr so far: {seen[-2000:]!r}")
        seen += chunk
    return seen.decode()


def test_sigterm_while_the_limiter_is_unreachable_exits_4_at_once(
    sandbox: SandboxProc, tmp_path: Path
) -> None:
    """SIGTERM while the shared limiter cannot be reached yet: exit 4 now, not after
    --limiter-timeout; nothing was sent."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(5))
    proc = subprocess.Popen(
        worker_cmd(
            "run",
            str(manifest),
            "--endpoint",
            sandbox.url,
            "--limiter",
            f"redis://127.0.0.1:{free_port()}/0",
            "--limiter-timeout",
            "60",
        ),
        env=cli_env(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    seen = _read_until(proc.stderr, "limiter.unreachable", within_s=30)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=30)
    err = seen + rest
    assert proc.returncode == 4, err[-2000:]
    assert time.monotonic() - started < 10
    assert sandbox.arrivals() == []


def test_two_sigints_40ms_apart_exit_4_and_the_rerun_completes(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """Two SIGINTs 40 ms apart while requests are on the wire: exit 4 (never -2), the ledger
    parses, and the same command then finishes the job with exit 0."""
    sb: SandboxProc = sandbox_factory("--rate", "50", "--latency-ms", "300-600")
    manifest = write_manifest(tmp_path / "m.jsonl", names(40))
    args = ["run", str(manifest), "--endpoint", sb.url, "--rate", "50"]
    proc = subprocess.Popen(
        worker_cmd(*args),
        env=cli_env(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(sb.creates()) < 5:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.04)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 4, err[-2000:]
    ledger_records(tmp_path / "m.ledger.jsonl")  # every line parses
    again = run_worker(*args, env=cli_env(tmp_path))
    assert again.returncode == 0, again.stderr[-2000:]
    assert all(g["created"] == 1 for g in sb.groups().values()) and len(sb.groups()) == 40


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (its SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.1, 0.3])
def test_sigterm_at_start_up_exits_4(tmp_path: Path, delay: float) -> None:
    """SIGTERM at several moments of start-up (the imports, parsing, the scan), from the
    moment the interpreter runs our first line: exit 4 with a message, never 143."""
    manifest = _big_manifest(tmp_path / "m.jsonl", 50_000)
    proc = subprocess.Popen(
        worker_cmd("run", str(manifest), "--endpoint", "http://127.0.0.1:9"),
        env=cli_env(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not _catches_sigterm(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 4, (proc.returncode, err[-2000:])
    assert "Traceback" not in err and ("nothing was changed" in err or "stopped" in err)


# -- options, exit codes --------------------------------------------------------------------


def test_global_options_go_before_or_after_the_command(tmp_path: Path) -> None:
    """`-q`, `-v` and `--log-format` are accepted before and after the subcommand."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(2))
    env = cli_env(tmp_path)
    for argv in (
        ["-q", "validate", str(manifest)],
        ["validate", str(manifest), "-q"],
        ["--log-format", "json", "validate", str(manifest)],
        ["validate", "--log-format", "console", str(manifest)],
    ):
        out = run_worker(*argv, env=env)
        assert out.returncode == 0, (argv, out.stderr)


def test_help_lists_every_command_and_the_exit_codes() -> None:
    """`worker --help` lists the commands; each command's help names its options, the
    environment variables and the exit codes."""
    env = dict(os.environ)
    top = subprocess.run(
        [sys.executable, "-m", "worker", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    for command in ("run", "sync", "export", "validate", "report", "sandbox"):
        assert command in top.stdout
    sync = subprocess.run(
        [sys.executable, "-m", "worker", "sync", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    for word in (
        "--prune",
        "--scope-project",
        "--max-delete",
        "--check",
        "--job",
        "WORKER_",
        "exit codes",
        "6 drift",
    ):
        assert word in sync.stdout, word


def test_an_internal_error_exits_70_with_its_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A bug (an exception that is not ours) is not exit 1 (rejected): it is 70, with the
    traceback and a plain sentence."""
    import structlog

    def boom(args: Any) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "cmd_validate", boom)
    # run_cli sets process-wide things: the streams, the log sink, signal handlers. Put
    # them back afterwards, or later tests in this process would log into a closed stream.
    monkeypatch.setattr(sys, "stdout", sys.stdout)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    manifest = write_manifest(tmp_path / "m.jsonl", names(1))
    try:
        code = cli.run_cli(["validate", str(manifest)])
        assert code == Exit.INTERNAL and int(code) == 70
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        structlog.reset_defaults()
    err = capsys.readouterr().err
    assert "RuntimeError: a bug" in err and "internal error" in err


def test_report_json_of_a_sync_counts_per_action(sandbox_factory: Any, tmp_path: Path) -> None:
    """After a sync that creates and updates, `report --json` counts outcomes per action."""
    sb: SandboxProc = sandbox_factory("--rate", "50")
    manifest = write_manifest(tmp_path / "m.jsonl", names(3))
    env = cli_env(tmp_path)
    assert run_worker("sync", str(manifest), "--endpoint", sb.url, env=env).returncode == 0
    changed = [dict(g, Tags=[]) for g in names(3)]
    write_manifest(manifest, changed)
    assert run_worker("sync", str(manifest), "--endpoint", sb.url, env=env).returncode == 0
    out = run_worker("report", str(tmp_path / "m.ledger.jsonl"), "--json", env=env)
    assert out.returncode == 0, out.stderr
    text = json.dumps(json.loads(out.stdout))
    assert "update" in text and "create" in text


@pytest.mark.parametrize("argv", [["--help"], ["validate", "M"], ["report", "L"]])
def test_commands_that_send_nothing_load_no_http_stack(tmp_path: Path, argv: list[str]) -> None:
    """`--help`, `validate` and `report` import neither the sandbox nor aiohttp (nor the
    runner): they start fast and stay small."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(2))
    words = [
        str(manifest) if w == "M" else str(tmp_path / "none.ledger.jsonl") if w == "L" else w
        for w in argv
    ]
    probe = (
        "import sys\nfrom worker.__main__ import entry\n"
        "import atexit\n"
        "atexit.register(lambda: print(sorted(m for m in sys.modules if m.startswith("
        "('aiohttp', 'worker.sandbox', 'worker.runner', 'redis'))), file=sys.stderr))\n"
        f"sys.argv = ['worker', *{words!r}]\nentry()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env=cli_env(tmp_path),
        timeout=60,
    )
    assert out.stderr.strip().splitlines()[-1] == "[]", out.stderr[-2000:]


def test_bad_region_and_scope_regex_are_usage_errors(tmp_path: Path) -> None:
    """A region with a control character and a regex that overflows the engine: exit 2 with
    a message naming the flag, never a traceback."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(1))
    env = cli_env(tmp_path)
    region = run_worker("run", str(manifest), "--region", "a\x01b", "--dry-run", env=env)
    assert region.returncode == 2 and "--region" in region.stderr
    scope = run_worker(
        "sync",
        str(manifest),
        "--prune",
        "--scope-match",
        "a{99999999999}",
        "--endpoint",
        "http://127.0.0.1:9",
        env=env,
    )
    assert scope.returncode == 2 and "--scope-match" in scope.stderr
    assert "Traceback" not in region.stderr + scope.stderr


def test_a_full_stdout_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    """`worker validate` / `report --failed` into /dev/full: exit 2 with the reason, no
    traceback (a closed pipe, by contrast, is a reader that left: not an error)."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(3))
    with open("/dev/full", "w") as full:
        out = subprocess.run(
            worker_cmd("validate", str(manifest)),
            env=cli_env(tmp_path),
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    assert out.returncode == 2, out.stderr
    assert "No space left" in out.stderr and "Traceback" not in out.stderr
