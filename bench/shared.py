"""Benchmark: many worker processes on one account, shared Redis budget vs per-process budgets.

    python -m bench.shared [--groups 240] [--rate 20] [--processes 1,3,6] [--runs 1]
                           [--redis redis://127.0.0.1:6379/0]

For each N in --processes (the groups split between them), N processes each run
`python -m worker run --rate RATE` at once against one strict sandbox at RATE/s, once with
`--limiter REDIS` and once with their own in-process budgets. Figures come from the
sandbox's arrival log: aggregate rate / limit (successful creates per second between the
first and the last arrival), FlowLimitExceeded answers, and the most arrivals in any sliding
second. For the shared runs, the processes' `limiter.stats` log lines say where the rest
went: slots used late and reported (they moved the schedule), slots lost to a stalled loop,
bookings refused by the horizon, Redis round trips and their mean time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from bench.harness import max_in_window, start_sandbox

AK, SK = "AKBENCH", "SKbenchsecret"
STATS = ("admitted", "reported_late", "missed", "refused", "redis_calls")


def trial(tmp: Path, processes: int, groups: int, rate: int, limiter: str | None) -> dict[str, Any]:
    sb = start_sandbox(tmp, "--rate", str(rate), "--latency-ms", "20-200", keys={AK: SK})
    tag = f"p{processes}-{'shared' if limiter else 'own'}-{os.urandom(3).hex()}"
    logs = [tmp / f"{tag}-{p}.log" for p in range(processes)]
    try:
        env = dict(os.environ, VOLC_ACCESSKEY=AK, VOLC_SECRETKEY=SK)
        procs = []
        for p in range(processes):
            manifest = tmp / f"{tag}-{p}.jsonl"
            manifest.write_text(
                "".join(
                    json.dumps({"Name": f"P{p}G{i:05d}"}) + "\n"
                    for i in range(p, groups, processes)
                )
            )
            cmd = [
                sys.executable,
                "-m",
                "worker",
                "run",
                str(manifest),
                "--endpoint",
                sb.url,
                "--rate",
                str(rate),
                "--log-format",
                "json",
            ]
            if limiter:
                cmd += ["--limiter", limiter]
            with logs[p].open("w") as err:  # a file, not a pipe: nobody reads it while it runs
                procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err))
        for proc in procs:
            proc.wait()
        arrivals = sb.creates()
    finally:
        sb.stop()
    ok = sorted(a["t"] for a in arrivals if a["code"] == "")
    stats: Counter[str] = Counter()
    rtts: list[float] = []
    for path in logs:
        for line in path.read_text(errors="replace").splitlines():
            if '"limiter.stats"' not in line:
                continue
            event = json.loads(line)
            stats.update({k: int(event.get(k, 0)) for k in STATS})
            rtts.append(float(event.get("redis_rtt_ms", 0.0)))
    return {
        "rate/limit": (len(ok) - 1) / (ok[-1] - ok[0]) / rate if len(ok) > 1 else float("nan"),
        "throttled": sum(1 for a in arrivals if a["code"] == "FlowLimitExceeded"),
        "max/s": max_in_window([a["t"] for a in arrivals]),
        "created": len(ok),
        "stats": stats,
        "rtt_ms": sum(rtts) / len(rtts) if rtts else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=240)
    parser.add_argument("--rate", type=int, default=20)
    parser.add_argument("--processes", default="1,3,6")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]
    print(
        f"{args.groups} groups split over N processes, one AK, strict sandbox at "
        f"{args.rate}/s, latency 20-200 ms"
    )
    print(
        f"{'N':>2}  {'shared: rate/limit':>18}{'throttled':>10}{'max/s':>7}"
        f"   {'per-process: rate/limit':>23}{'throttled':>10}{'max/s':>7}"
        f"   shared: late  lost  refused  redis calls (ms)"
    )
    with tempfile.TemporaryDirectory() as d:
        for _ in range(args.runs):
            for n in counts:
                shared = trial(Path(d), n, args.groups, args.rate, args.redis)
                alone = trial(Path(d), n, args.groups, args.rate, None)
                s = shared["stats"]
                print(
                    f"{n:>2}  {shared['rate/limit']:>18.3f}{shared['throttled']:>10}"
                    f"{shared['max/s']:>7}   {alone['rate/limit']:>23.3f}"
                    f"{alone['throttled']:>10}{alone['max/s']:>7}"
                    f"   {s['reported_late']:>12}{s['missed']:>6}{s['refused']:>9}"
                    f"{s['redis_calls']:>13} ({shared['rtt_ms']:.2f})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
