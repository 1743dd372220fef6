"""What `bench.sync`'s rows share: the account (a sandbox process), one measured worker child,
and the table cells; requests are counted by the sandbox, never by the worker."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.harness import SandboxProc, start_sandbox
from worker.api import spec
from worker.settings import Pacing

AK, SK = "AKBENCHSYNC", "SKbenchsyncsecret"
SHORT = {
    spec.LIST: "List",
    "CreatePullToPushGroup": "Create",
    "UpdatePullToPushGroup": "Update",
    "DeletePullToPushGroup": "Delete",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Measured:
    """One worker child: what the sandbox saw of it and what the kernel says it cost."""

    shown: str  # the command line, paths shortened
    rate: float
    wall_s: float
    rss_mb: float
    code: int
    actions: Mapping[str, int]  # requests per action, every answer counted
    codes: Mapping[str, int]  # error codes answered (Exist, FlowLimitExceeded, ...)
    span_s: float  # first arrival to last, 0 without two arrivals
    first_s: float | None  # the child's start to its first arrival; None without any

    @property
    def requests(self) -> int:
        return sum(self.actions.values())

    def projected_s(self, rate: float) -> float:
        """Wall time at `rate`: this run's start-up and tail (its wall time outside the
        span of its requests) plus the same requests spread at the worker's target."""
        overhead = self.wall_s - self.span_s
        return overhead + max(self.requests - 1, 0) / Pacing(rate=rate).target


def group(i: int, batch: str) -> str:
    body = {
        "Name": f"组{i:08d}",
        "ProjectName": "default",
        "Tags": [{"Key": "批次", "Value": batch, "Category": "Custom"}],
    }
    return json.dumps(body, ensure_ascii=False) + "\n"


def write(path: Path, lines: Iterator[str]) -> Path:
    with path.open("w", encoding="utf-8", buffering=1 << 20) as f:
        f.writelines(lines)
    return path


@contextmanager
def account(tmp: Path, rate: float, preload: Path, *extra: str) -> Iterator[SandboxProc]:
    """A sandbox process at `rate` holding the groups of `preload` (`extra`: more sandbox
    options, e.g. --latency-ms), stopped on the way out."""
    sb = start_sandbox(tmp, "--rate", f"{rate:g}", "--preload", str(preload), *extra, keys={AK: SK})
    try:
        yield sb
    finally:
        sb.stop()


def worker(tmp: Path, env: dict[str, str], sb: SandboxProc, rate: float, *args: str) -> Measured:
    """Run `python -m worker ARGS` (with --endpoint and --rate when it talks to `sb`) and
    measure it; a worker still running when we are interrupted is killed."""
    talks = args[0] != "validate"
    argv = [*args, *(("--endpoint", sb.url, "--rate", f"{rate:g}") if talks else ()), "-q"]
    before = len(sb.arrivals())
    errors = tmp / f"stderr-{time.monotonic_ns()}.txt"
    started, started_wall = time.monotonic(), time.time()  # arrivals carry wall times
    with errors.open("wb") as err:  # a file, not a pipe: nobody reads it while it runs
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", *argv],
            cwd=tmp,  # paths in ARGS are relative to it: the table shows them as given
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    wall = time.monotonic() - started
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0:
        with errors.open("rb") as f:
            tail = f.read()[-2000:].decode(errors="replace")  # bounded: the end says why
        print(f"note: worker {argv[0]} exited {code}: {tail.strip()}", file=sys.stderr)
    arrivals = sb.arrivals()[before:]
    times = [float(a["t"]) for a in arrivals]
    shown = shlex.join(["worker", *argv]).replace(sb.url, "$SANDBOX")
    return Measured(
        shown=shown,
        rate=rate,
        wall_s=wall,
        rss_mb=usage.ru_maxrss / 1024,
        code=code,
        actions=Counter(SHORT.get(a["action"], a["action"]) for a in arrivals),
        codes=Counter(a["code"] for a in arrivals if a["code"]),
        span_s=max(times) - min(times) if len(times) > 1 else 0.0,
        first_s=min(times) - started_wall if times else None,
    )


def n(x: int) -> str:
    return f"{x:,}".replace(",", " ")


def requests(m: Measured) -> str:
    order = list(SHORT.values())
    ranked = sorted(m.actions.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 9)
    parts = [f"{action} {n(count)}" for action, count in ranked]
    answers = ", ".join(f"{code} {n(c)}" for code, c in sorted(m.codes.items()))
    if not parts:
        return "0"
    return (
        f"**{n(m.requests)}**: " + ", ".join(parts) + (f" (answers: {answers})" if answers else "")
    )


def wall(m: Measured) -> str:
    """The wall time, and when inside it the requests went out: what is start-up and
    planning, what is paced sending."""
    if m.first_s is None:
        return f"{m.wall_s:.1f} s"
    return f"{m.wall_s:.1f} s (requests at {m.first_s:.1f}–{m.first_s + m.span_s:.1f} s)"


def table(header: str, rows: list[str]) -> None:
    cells = header.count("|") - 1
    print(header)
    print("|" + " --- |" * cells)
    for r in rows:
        print(r, flush=True)
    print()
