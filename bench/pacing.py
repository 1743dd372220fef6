"""Benchmark: pacing against a strict sliding-window sandbox, this worker vs naive clients.

    python -m bench.pacing [--groups 300] [--rate 50] [--latency-ms 20-400] [--runs 1]

Each contender creates the same number of groups against its own fresh sandbox process
(strict window at --rate, the given latency), and the figures come from the sandbox's arrival
log, not from the client: achieved rate / limit (successful creates per second between the
first and the last arrival), FlowLimitExceeded answers, and the most arrivals in any sliding
second. Contenders:

  worker                   `python -m worker run` as a user runs it (LocalPacer)
  LocalPacer               the worker's pacer in the bench client below
  AsyncLimiter(1, 1/T)+gate aiolimiter spaced evenly at the worker's target T (the limit less
                           its headroom), with the worker's cool-down gate after a
                           FlowLimitExceeded: what the worker would be if built on aiolimiter
  AsyncLimiter(N, 1)       aiolimiter's obvious setting: a bucket of N that refills over 1 s
  AsyncLimiter(1, 1/N)     aiolimiter spaced evenly, no headroom

The two paced clients (LocalPacer, AsyncLimiter+gate) send through the same signer,
transport and concurrency, retry a FlowLimitExceeded after telling their pacer, and differ
only in the pacer: they isolate the pacer from the rest of the worker. The naive clients send
each group once and do not retry: their throttled count is what the account saw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiolimiter import AsyncLimiter

from bench.harness import SandboxProc, max_in_window, start_sandbox
from worker.api import spec
from worker.api.signing import Credentials, sign
from worker.api.transport import Response, Transport
from worker.pacing.budget import Pacer
from worker.pacing.local import LocalPacer
from worker.settings import Pacing

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
    manifest = tmp / f"worker-{time.monotonic_ns()}.jsonl"  # a fresh ledger for every run
    manifest.write_text("".join(json.dumps({"Name": f"W{i:06d}"}) + "\n" for i in range(groups)))
    env = dict(os.environ, VOLC_ACCESSKEY=AK, VOLC_SECRETKEY=SK)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "worker",
            "run",
            str(manifest),
            "--endpoint",
            sb.url,
            "--rate",
            str(rate),
            "--quiet",
        ],
        env=env,
        check=False,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class AiolimiterPacer:
    """The worker's Pacer built on aiolimiter: AsyncLimiter(1, 1/target) plus a cool-down gate."""

    def __init__(
        self,
        pacing: Pacing,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._limiter = AsyncLimiter(1, 1 / pacing.target)
        self._cooldown_s = pacing.cooldown_s
        self._clock = clock
        self._sleep = sleep
        self._gate_until = float("-inf")

    async def acquire(self) -> None:
        while (left := self._gate_until - self._clock()) > 0:
            await self._sleep(left)
        await self._limiter.acquire()

    def throttled(self, retry_after_s: float | None = None) -> None:
        now = self._clock()
        if now >= self._gate_until:  # one pause per burst of answers, as LocalPacer
            self._gate_until = now + self._cooldown_s


async def run_paced(sb: SandboxProc, groups: int, pacer: Pacer, concurrency: int) -> None:
    """Send every group through `pacer`, retrying FlowLimitExceeded after telling the pacer."""
    creds = Credentials(access_key=AK, secret_key=SK)
    query = {"Action": spec.CREATE, "Version": spec.VERSION}
    host = urlsplit(sb.url).netloc
    names = iter(range(groups))
    async with Transport(sb.url, timeout_s=15, max_connections=concurrency) as transport:

        async def one_sender() -> None:
            for i in names:
                body = orjson.dumps({"Name": f"P{i:06d}", "ProjectName": "default"})
                for _ in range(20):
                    await pacer.acquire()
                    headers = sign(
                        method="POST",
                        host=host,
                        path="/",
                        query=query,
                        content_type="application/json",
                        body=body,
                        credentials=creds,
                        region="cn-north-1",
                        now=datetime.now(UTC),
                    )
                    answer = await transport.send(query, headers, body)
                    if isinstance(answer, Response) and b"FlowLimitExceeded" in answer.body:
                        pacer.throttled()
                        continue
                    break

        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(one_sender())


async def run_naive(sb: SandboxProc, groups: int, limiter: AsyncLimiter, concurrency: int) -> None:
    creds = Credentials(access_key=AK, secret_key=SK)
    query = {"Action": spec.CREATE, "Version": spec.VERSION}
    host = urlsplit(sb.url).netloc
    names = iter(range(groups))
    async with Transport(sb.url, timeout_s=15, max_connections=concurrency) as transport:

        async def one_sender() -> None:
            for i in names:
                body = orjson.dumps({"Name": f"N{i:06d}", "ProjectName": "default"})
                async with limiter:
                    headers = sign(
                        method="POST",
                        host=host,
                        path="/",
                        query=query,
                        content_type="application/json",
                        body=body,
                        credentials=creds,
                        region="cn-north-1",
                        now=datetime.now(UTC),
                    )
                await transport.send(query, headers, body)

        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(one_sender())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=300)
    parser.add_argument("--rate", type=int, default=50)
    parser.add_argument("--latency-ms", default="20-400")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    sandbox_args = ("--rate", str(args.rate), "--latency-ms", args.latency_ms)
    concurrency = max(4, int(args.rate * 2.5))
    rows: dict[str, list[dict[str, Any]]] = {}
    pacing = Pacing(rate=args.rate)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        contenders: list[tuple[str, Callable[[SandboxProc], None]]] = [
            ("worker", lambda sb: run_worker(tmp, sb, args.groups, args.rate)),
            (
                "LocalPacer",
                lambda sb: asyncio.run(run_paced(sb, args.groups, LocalPacer(pacing), concurrency)),
            ),
            (
                "AsyncLimiter(1, 1/T)+gate",
                lambda sb: asyncio.run(
                    run_paced(sb, args.groups, AiolimiterPacer(pacing), concurrency)
                ),
            ),
            (
                f"AsyncLimiter({args.rate}, 1)",
                lambda sb: asyncio.run(
                    run_naive(sb, args.groups, AsyncLimiter(args.rate, 1), concurrency)
                ),
            ),
            (
                f"AsyncLimiter(1, 1/{args.rate})",
                lambda sb: asyncio.run(
                    run_naive(sb, args.groups, AsyncLimiter(1, 1 / args.rate), concurrency)
                ),
            ),
        ]
        print(
            f"pacing: {args.groups} groups, strict sandbox at {args.rate}/s, "
            f"latency {args.latency_ms} ms, target {pacing.target:g}/s"
        )
        print(f"{'client':<27}{'rate/limit':>11}{'throttled':>11}{'max/s':>8}{'created':>9}")
        for _ in range(args.runs):  # interleaved, so that a noisy minute hits every contender
            for label, go in contenders:
                sb = start_sandbox(tmp, *sandbox_args, keys={AK: SK})
                try:
                    go(sb)
                    f = figures(sb, args.rate)
                finally:
                    sb.stop()
                rows.setdefault(label, []).append(f)
                print(
                    f"{label:<27}{f['rate/limit']:>11.3f}{f['throttled']:>11}{f['max/s']:>8}"
                    f"{f['created']:>9}",
                    flush=True,
                )
    if args.runs > 1:
        print(
            f"over {args.runs} runs: mean rate/limit (min-max), throttled in all runs, "
            "highest max/s"
        )
        for label, fs in rows.items():
            r = [f["rate/limit"] for f in fs]
            print(
                f"{label:<27}{statistics.mean(r):>11.3f} ({min(r):.3f}-{max(r):.3f})"
                f"{sum(f['throttled'] for f in fs):>6}{max(f['max/s'] for f in fs):>8}"
            )


if __name__ == "__main__":
    main()
