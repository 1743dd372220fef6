"""Benchmark: pacing against a strict sliding-window sandbox, this worker vs naive clients.

    python -m bench.pacing [--groups 300] [--rate 50] [--latency-ms 20-400]

Each contender creates the same number of groups against its own fresh sandbox process
(strict window at --rate, the given latency), and the figures come from the sandbox's arrival
log, not from the client: achieved rate / limit (successful creates per second between the
first and the last arrival), FlowLimitExceeded answers, and the most arrivals in any sliding
second. Contenders:

  worker              `python -m worker run` as a user runs it
  AsyncLimiter(N, 1)  aiolimiter's obvious setting: a bucket of N that refills over 1 s
  AsyncLimiter(1, 1/N) aiolimiter spaced evenly, no headroom

The naive clients send each group once through the same signer and transport, with enough
concurrency for the latency, and do not retry: their throttled count is what the account saw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiolimiter import AsyncLimiter

from bench.harness import SandboxProc, max_in_window, start_sandbox
from worker import api
from worker.signing import Credentials, sign
from worker.transport import Transport

AK, SK = "AKBENCH", "SKbenchsecret"


def figures(sb: SandboxProc, rate: float) -> dict[str, Any]:
    arrivals = sb.creates()
    ok = sorted(a["t"] for a in arrivals if a["code"] == "")
    span = ok[-1] - ok[0] if len(ok) > 1 else float("nan")
    return {
        "created": len(ok),
        "rate/limit": (len(ok) - 1) / span / rate if len(ok) > 1 else float("nan"),
        "throttled": sum(1 for a in arrivals if a["code"] == "FlowLimitExceeded"),
        "max/s": max_in_window([a["t"] for a in arrivals]),
        "requests": len(arrivals),
    }


def run_worker(tmp: Path, sb: SandboxProc, groups: int, rate: float) -> None:
    manifest = tmp / "worker.jsonl"
    manifest.write_text("".join(json.dumps({"Name": f"W{i:06d}"}) + "\n" for i in range(groups)))
    env = dict(os.environ, VOLC_ACCESSKEY=AK, VOLC_SECRETKEY=SK)
    subprocess.run([sys.executable, "-m", "worker", "run", str(manifest), "--endpoint", sb.url,
                    "--rate", str(rate), "--quiet"], env=env, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def run_naive(sb: SandboxProc, groups: int, limiter: AsyncLimiter, concurrency: int) -> None:
    creds = Credentials(access_key=AK, secret_key=SK)
    query = {"Action": api.CREATE, "Version": api.VERSION}
    host = urlsplit(sb.url).netloc
    names = iter(range(groups))
    async with Transport(sb.url, timeout_s=15, max_connections=concurrency) as transport:
        async def one_sender() -> None:
            for i in names:
                body = orjson.dumps({"Name": f"N{i:06d}", "ProjectName": "default"})
                async with limiter:
                    headers = sign(method="POST", host=host, path="/", query=query,
                                   content_type="application/json", body=body,
                                   credentials=creds, region="cn-north-1",
                                   now=datetime.now(UTC))
                await transport.send(query, headers, body)
        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(one_sender())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=300)
    parser.add_argument("--rate", type=int, default=50)
    parser.add_argument("--latency-ms", default="20-400")
    args = parser.parse_args()
    sandbox_args = ("--rate", str(args.rate), "--latency-ms", args.latency_ms)
    concurrency = max(4, int(args.rate * 2.5))
    rows: list[tuple[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        contenders = [
            ("worker", lambda sb: run_worker(tmp, sb, args.groups, args.rate)),
            (f"AsyncLimiter({args.rate}, 1)", lambda sb: asyncio.run(run_naive(
                sb, args.groups, AsyncLimiter(args.rate, 1), concurrency))),
            (f"AsyncLimiter(1, 1/{args.rate})", lambda sb: asyncio.run(run_naive(
                sb, args.groups, AsyncLimiter(1, 1 / args.rate), concurrency))),
        ]
        for label, go in contenders:
            sb = start_sandbox(tmp, *sandbox_args, keys={AK: SK})
            try:
                go(sb)
                rows.append((label, figures(sb, args.rate)))
            finally:
                sb.stop()
    print(f"pacing: {args.groups} groups, strict sandbox at {args.rate}/s, "
          f"latency {args.latency_ms} ms")
    print(f"{'client':<24}{'rate/limit':>11}{'throttled':>11}{'max/s':>8}{'created':>9}")
    for label, f in rows:
        print(f"{label:<24}{f['rate/limit']:>11.3f}{f['throttled']:>11}{f['max/s']:>8}"
              f"{f['created']:>9}")


if __name__ == "__main__":
    main()
