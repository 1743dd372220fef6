"""Benchmark: client CPU per request at a high rate, the worker against a bare loop (issue 11).

    python -m bench.cpu [--requests N] [--rate R] [--runs 3]

Both talk to the same sandbox process (signatures checked, a window far above the rate) on
loopback, so the server's CPU is not counted. The worker is the real CLI in a child process:
its CPU (user + system, from wait4) for N groups, less that of a 1-group run (interpreter,
imports, manifest scan start-up), over N - 1 requests. The floor is a child process that
signs each body and posts it with aiohttp, 64 in flight, and counts only its loop's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.harness import start_sandbox

AK, SK = "AKBENCHCPU", "SKbenchCPUsecret"


def _child_cpu(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """(user + system CPU seconds, exit code) of one child process."""
    proc = subprocess.Popen(
        cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime, proc.returncode


def _manifest(path: Path, n: int) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"Name": f"Cpu{i:07d}", "ProjectName": "default"}) + "\n")
    return path


async def _floor_loop(url: str, n: int, in_flight: int) -> float:
    """CPU seconds of signing and posting n bodies, in_flight at a time."""
    import aiohttp

    from worker.api import spec
    from worker.api.signing import Credentials, sign

    creds = Credentials(access_key=AK, secret_key=SK)
    host = url.split("//", 1)[1]
    query = {"Action": spec.CREATE, "Version": spec.VERSION}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def one(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            body = json.dumps({"Name": f"Floor{i:07d}", "ProjectName": "default"}).encode()
            headers = sign(
                method="POST",
                host=host,
                path="/",
                query=query,
                content_type="application/json",
                body=body,
                credentials=creds,
                region=spec.DEFAULT_REGION,
                now=_now(),
            )
            async with session.post(url + "/", params=query, headers=headers, data=body) as resp:
                await resp.read()

    async with aiohttp.ClientSession() as session:
        started = time.process_time()
        await asyncio.gather(*(one(session) for _ in range(in_flight)))
        return time.process_time() - started


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    """One measurement: the worker's and the floor's CPU per request, in milliseconds."""

    requests: int
    worker_ms: float
    floor_ms: float
    exit_code: int
    wall_s: float

    @property
    def ratio(self) -> float:
        return self.worker_ms / self.floor_ms


def measure(requests: int = 3000, rate: float = 5000.0) -> Row:
    """Both clients against one fresh sandbox, the worker first."""
    n = requests
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp_name:
        tmp = Path(tmp_name)
        sb = start_sandbox(tmp, "--rate", "1000000", keys={AK: SK})
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("VOLC", "WORKER_"))}
            env.update(HOME=str(tmp), VOLC_ACCESSKEY=AK, VOLC_SECRETKEY=SK)
            worker = [
                sys.executable,
                "-m",
                "worker",
                "run",
                "--endpoint",
                sb.url,
                "--rate",
                str(rate),
                "-q",
            ]
            one, _ = _child_cpu([*worker, str(_manifest(tmp / "one.jsonl", 1))], env)
            many_path = _manifest(tmp / "many.jsonl", n)
            t0 = time.monotonic()
            many, code = _child_cpu([*worker, str(many_path)], env)
            wall = time.monotonic() - t0
            floor_out = subprocess.run(
                [sys.executable, "-m", "bench.cpu", "--floor", sb.url, str(n)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            floor = float(floor_out.stdout.strip().splitlines()[-1])
        finally:
            sb.stop()
    return Row(
        requests=n,
        worker_ms=(many - one) / max(1, n - 1) * 1000,
        floor_ms=floor / n * 1000,
        exit_code=code,
        wall_s=wall,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=5000.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--floor", nargs=2, metavar=("URL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor:  # the child that measures the bare loop
        url, n = args.floor[0], int(args.floor[1])
        print(asyncio.run(_floor_loop(url, n, 64)))
        return
    n = args.requests
    print(f"python -m bench.cpu --requests {n} --rate {args.rate:g} --runs {args.runs}")
    print(
        "| run | worker run: CPU per request | floor: sign + aiohttp post, 64 in flight | ratio |"
    )
    print("| --- | --- | --- | --- |")
    rows = []
    for i in range(args.runs):
        row = measure(n, args.rate)
        rows.append(row)
        print(
            f"| {i + 1} | {row.worker_ms:.3f} ms (exit {row.exit_code}, {row.wall_s:.1f} s wall) "
            f"| {row.floor_ms:.3f} ms | {row.ratio:.2f}x |",
            flush=True,
        )
    if args.runs > 1:
        ratios = [r.ratio for r in rows]
        print(
            f"ratio to the floor over {args.runs} runs: mean {statistics.mean(ratios):.2f}x "
            f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x)"
        )
    self_cpu = resource.getrusage(resource.RUSAGE_SELF)
    print(f"(the bench's own CPU: {self_cpu.ru_utime + self_cpu.ru_stime:.1f} s)")


if __name__ == "__main__":
    main()
