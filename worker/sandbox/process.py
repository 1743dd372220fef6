"""The sandbox as a real process, seen from outside: `start_sandbox` starts
`python -m worker sandbox` on a free loopback port and `SandboxProc` reads what it knows
(its arrival log, /_sandbox/state); `max_in_window` counts arrivals by the sandbox's own rule.

Shared by the tests and the benchmarks, which must not import each other; standard library
only, so importing it never loads the server."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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

    def of(self, action: str) -> list[dict[str, Any]]:
        """Arrivals of one action (e.g. "ListPullToPushGroup"), in arrival order. Each has
        `t`, `ak`, `action`, `name` (None for List), `page` (List's PageNum), `status`, `code`."""
        return [a for a in self.arrivals() if a["action"] == action]

    def creates(self) -> list[dict[str, Any]]:
        """Arrivals of CreatePullToPushGroup requests, in arrival order."""
        return self.of("CreatePullToPushGroup")

    def groups(self) -> dict[str, dict[str, Any]]:
        """Every group the sandbox holds (deleted ones too, Status 1), by Name: Name,
        ProjectName, Tags, Status and the counters created, updated, deleted,
        exist_answers, requests."""
        return {g["Name"]: g for g in self.state()["groups"]}

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


def start_sandbox(tmp: Path, *args: str, keys: dict[str, str]) -> SandboxProc:
    stamp = time.monotonic_ns()
    log = tmp / f"arrivals-{stamp}.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "worker",
        "sandbox",
        "--port",
        "0",
        "--log",
        str(log),
        "--keys",
        ",".join(f"{k}:{v}" for k, v in keys.items()),
        *args,
    ]
    errors = tmp / f"sandbox-stderr-{stamp}.txt"
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


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """Most arrivals inside any span (t - window, t], the sandbox's own rule."""
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best
