"""Who holds the lock: a run names itself in `<ledger>.lock`, a second run's exit 5 names it
(pid, host, command), and a ledger of another region names both regions."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import SandboxProc, cli_env, names, run_worker, worker_cmd, write_manifest
from worker.ledger.lock import MAX_HOLDER_BYTES, Holder, lock_path, read_holder


def wait_for_holder(lock: Path, proc: subprocess.Popen[str], limit_s: float = 60) -> Holder:
    """The holder note once the run has written it (the run's own event, not a fixed sleep)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if lock.exists():
            fd = os.open(lock, os.O_RDONLY)
            try:
                holder = read_holder(fd)
            finally:
                os.close(fd)
            if holder is not None and holder.pid == proc.pid:
                return holder
        time.sleep(0.05)
    raise AssertionError("the run never named itself in its lock file")


@pytest.mark.slow
def test_a_second_run_on_a_held_ledger_names_the_holder(
    sandbox: SandboxProc, tmp_path: Path
) -> None:
    """While a real run holds the ledger, a second exits 5 naming its pid, host and
    command, and says a held lock is a live process; the note is cleared when it ends."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(20))
    env = cli_env(tmp_path)
    # At 0.2 requests/s the first run holds the ledger for a long while.
    first = subprocess.Popen(
        worker_cmd("run", str(manifest), "--endpoint", sandbox.url, "--rate", "0.2"),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    lock = lock_path(tmp_path / "m.ledger.jsonl")
    try:
        holder = wait_for_holder(lock, first)
        second = run_worker("run", str(manifest), "--endpoint", sandbox.url, env=env)
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
    assert second.returncode == 5, second.stderr
    said = second.stderr
    assert f"pid {first.pid}" in said and socket.gethostname() in said
    assert f"worker run {manifest.resolve()}" in said and holder.command in said
    assert f"ps -p {first.pid}" in said and "kill -9" in said
    assert "Traceback" not in said
    assert first.returncode == 4
    assert lock.read_bytes() == b""  # the note went with its holder


@pytest.mark.slow
def test_another_region_on_a_ledger_names_both_regions(
    sandbox: SandboxProc, tmp_path: Path
) -> None:
    """A wrong --region on an existing ledger: exit 2 naming the ledger's region and the
    run's, and how to use the ledger's."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(1))
    env = cli_env(tmp_path)
    assert run_worker("run", str(manifest), "--endpoint", sandbox.url, env=env).returncode == 0
    out = run_worker(
        "run", str(manifest), "--endpoint", sandbox.url, "--region", "ap-southeast-1", env=env
    )
    assert out.returncode == 2, out.stderr
    assert "--region 'cn-north-1' (this run: 'ap-southeast-1')" in out.stderr
    assert "run with it (--region cn-north-1)" in out.stderr


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"12345\n",  # an older worker, or another tool, wrote a bare pid
        b"\xff\xfe garbage",
        b'{"pid": "1", "host": "h", "command": "c", "started": "s"}',
        b'{"pid": true, "host": "h", "command": "c", "started": "s"}',
        b'{"pid": -4, "host": "h", "command": "c", "started": "s"}',
        b'{"pid": 7, "host": 1, "command": "c", "started": "s"}',
        b"[1, 2]",
    ],
)
def test_a_lock_file_that_is_not_a_holder_note_names_nobody(tmp_path: Path, data: bytes) -> None:
    """Whatever else is in the lock file is not believed: no holder, no exception."""
    path = tmp_path / "l.lock"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_holder(fd) is None
    finally:
        os.close(fd)


def test_a_holder_note_is_read_bounded_and_shown_safely(tmp_path: Path) -> None:
    """Control characters are escaped, long fields cut, and an oversized file is ignored."""
    hostile = Holder(pid=42, host="h\x1b[2J", command="c" * 5000, started="s")
    path = tmp_path / "l.lock"
    path.write_bytes(hostile.to_bytes()[: MAX_HOLDER_BYTES - 1])
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_holder(fd) is None  # cut mid-JSON: not a note
        path.write_bytes(
            Holder(pid=42, host="h\x1b[2J", command="c" * 1000, started="s").to_bytes()
        )
        shown = read_holder(fd)
        assert shown is not None and shown.host == "h\\x1b[2J" and len(shown.command) == 300
        path.write_bytes(b" " * (MAX_HOLDER_BYTES + 1))
        assert read_holder(fd) is None
    finally:
        os.close(fd)
