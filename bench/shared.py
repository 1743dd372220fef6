"""Benchmark: many worker processes on one account, shared Redis budget vs per-process budgets.

    python -m bench.shared [--groups 160] [--rate 20] [--redis redis://127.0.0.1:6379/0]

For 1, 2 and 4 processes (the groups split between them), each process runs
`python -m worker run --rate RATE` against one strict sandbox at RATE/s, once with
`--limiter REDIS` and once with its own in-process budget. Figures come from the sandbox's
arrival log: aggregate rate / limit (successful creates per second between the first and the
last arrival), FlowLimitExceeded answers, and the most arrivals in any sliding second.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import max_in_window, start_sandbox

AK, SK = "AKBENCH", "SKbenchsecret"


def trial(tmp: Path, processes: int, groups: int, rate: int, limiter: str | None) -> dict[str, Any]:
    sb = start_sandbox(tmp, "--rate", str(rate), "--latency-ms", "20-200", keys={AK: SK})
    try:
        env = dict(os.environ, VOLC_ACCESSKEY=AK, VOLC_SECRETKEY=SK)
        procs = []
        for p in range(processes):
            manifest = tmp / f"p{processes}-{p}-{limiter is not None}.jsonl"
            manifest.write_text("".join(json.dumps({"Name": f"P{p}G{i:05d}"}) + "\n"
                                        for i in range(p, groups, processes)))
            cmd = [sys.executable, "-m", "worker", "run", str(manifest), "--endpoint", sb.url,
                   "--rate", str(rate), "--quiet"]
            if limiter:
                cmd += ["--limiter", limiter]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        for proc in procs:
            proc.wait()
        arrivals = sb.creates()
    finally:
        sb.stop()
    ok = sorted(a["t"] for a in arrivals if a["code"] == "")
    return {
        "rate/limit": (len(ok) - 1) / (ok[-1] - ok[0]) / rate,
        "throttled": sum(1 for a in arrivals if a["code"] == "FlowLimitExceeded"),
        "max/s": max_in_window([a["t"] for a in arrivals]),
        "created": len(ok),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=160)
    parser.add_argument("--rate", type=int, default=20)
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args()
    print(f"{args.groups} groups split over N processes, one AK, strict sandbox at "
          f"{args.rate}/s, latency 20-200 ms")
    print(f"{'N':>2}  {'shared: rate/limit':>18}{'throttled':>10}{'max/s':>7}"
          f"   {'per-process: rate/limit':>23}{'throttled':>10}{'max/s':>7}")
    with tempfile.TemporaryDirectory() as d:
        for n in (1, 2, 4):
            shared = trial(Path(d), n, args.groups, args.rate, args.redis)
            alone = trial(Path(d), n, args.groups, args.rate, None)
            print(f"{n:>2}  {shared['rate/limit']:>18.3f}{shared['throttled']:>10}"
                  f"{shared['max/s']:>7}   {alone['rate/limit']:>23.3f}{alone['throttled']:>10}"
                  f"{alone['max/s']:>7}", flush=True)


if __name__ == "__main__":
    main()
