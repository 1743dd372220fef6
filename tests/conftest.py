"""Shared fixtures: the sandbox as a real process on loopback, and the CLI as a real process."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

AK, SK = "AKTESTE2E", "SKtestE2Esecret"


@dataclass
class SandboxProc:
    """A `python -m worker sandbox` process and what it knows."""

    proc: subprocess.Popen[str]
    url: str
    log: Path
    keys: dict[str, str] = field(default_factory=dict)

    def state(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/_sandbox/state", timeout=10) as resp:
            data: dict[str, Any] = json.load(resp)
        return data

    def arrivals(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_sandbox(tmp: Path, *args: str, keys: dict[str, str] | None = None) -> SandboxProc:
    keys = keys or {AK: SK}
    log = tmp / f"arrivals-{time.monotonic_ns()}.jsonl"
    cmd = [sys.executable, "-m", "worker", "sandbox", "--port", "0", "--log", str(log),
           "--keys", ",".join(f"{k}:{v}" for k, v in keys.items()), *args]
    errors = tmp / f"sandbox-stderr-{time.monotonic_ns()}.txt"
    with errors.open("w") as err:  # a file, not a pipe: a chatty sandbox must never block
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("sandbox listening on "):
        proc.kill()
        proc.wait()
        proc.stdout.close()
        raise RuntimeError(f"sandbox did not start: {line!r} {errors.read_text()}")
    return SandboxProc(proc=proc, url=line.split()[-1], log=log, keys=keys)


@pytest.fixture
def sandbox_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[SandboxProc] = []

    def make(*args: str, keys: dict[str, str] | None = None) -> SandboxProc:
        sb = start_sandbox(tmp_path, *args, keys=keys)
        started.append(sb)
        return sb

    yield make
    for sb in started:
        sb.stop()


@pytest.fixture
def sandbox(sandbox_factory: Any) -> SandboxProc:
    sb: SandboxProc = sandbox_factory()
    return sb


def cli_env(home: Path, ak: str = AK, sk: str = SK, token: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOLC_", "WORKER_"))}
    env.update(HOME=str(home), VOLC_ACCESSKEY=ak, VOLC_SECRETKEY=sk, PYTHONUNBUFFERED="1")
    if token is not None:
        env["VOLC_SESSION_TOKEN"] = token
    return env


def worker_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "worker", *args]


def run_worker(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(worker_cmd(*args), env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def write_manifest(path: Path, groups: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(g, ensure_ascii=False) + "\n" for g in groups),
                    encoding="utf-8")
    return path


def names(n: int, prefix: str = "组") -> list[dict[str, Any]]:
    """n valid groups with Chinese names and a tag each."""
    return [{"Name": f"{prefix}{i:05d}", "ProjectName": "default",
             "Tags": [{"Key": "批次", "Value": f"b{i % 7}", "Category": "Custom"}]}
            for i in range(n)]


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """Most arrivals inside any half-open span [t, t + window)."""
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def ledger_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
