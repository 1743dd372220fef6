"""Benchmark: many worker processes on one account, shared Redis budget vs per-process budgets.

    python -m bench.shared [--groups 240] [--rate 20] [--processes 1,3,6] [--runs 1]
                           [--redis redis://127.0.0.1:6379/0]

For each N in --processes (the groups split between them), N processes each run
`python -m worker run --rate RATE` at once against one strict sandbox at RATE/s, once with
`--limiter REDIS` and once with their own in-process budgets. Figures come from the
sandbox's arrival log: aggregate rate / limit (successful creates per second between the
first and the last arrival), FlowLimitExceeded answers, the most arrivals in any sliding
second, and how far the arrivals fell behind the target's schedule (the last arrival less
where it would be had every one kept 1/target from the one before: the whole loss). At the
default headroom a perfect pacer scores 0.970 (the target is 97 % of the limit), and one slot
lost over the default 240 groups costs 0.004. For the shared runs, the processes'
`limiter.stats` log lines say where the loss went: slots used late and reported (they moved
the schedule), of those the ones the watchdog reported (the loop was held right after an
admission), their lateness in total, slots lost to a stalled loop, bookings refused by the
horizon, Redis round trips and their mean time.

`measure()` gives one `Row` per N for another benchmark to print (bench.scale).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.harness import max_in_window, start_sandbox
from worker.settings import DEFAULT_HEADROOM

AK, SK = "AKBENCH", "SKbenchsecret"
STATS = ("admitted", "reported_late", "stalled", "late_ms", "missed", "refused", "redis_calls")
DEFAULT_REDIS = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


@dataclass(frozen=True, slots=True, kw_only=True)
class Trial:
    """One run of N processes against a fresh sandbox: its arrival log, and the processes'
    `limiter.stats` summed (empty for per-process budgets, which keep no such counters)."""

    rate_limit: float  # successful creates per second, first to last arrival, over the limit
    throttled: int  # FlowLimitExceeded answers
    max_per_s: int  # most arrivals in any sliding second
    created: int
    behind_ms: float  # the last arrival's lateness against 1/target from the first
    stats: dict[str, float]
    rtt_ms: float  # mean Redis round trip over the processes (nan without Redis)


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    """Every run at one N: the shared budget and the per-process budgets, one Trial per run."""

    processes: int
    shared: tuple[Trial, ...]
    per_process: tuple[Trial, ...]

    @property
    def shared_rate(self) -> float:
        return statistics.mean(t.rate_limit for t in self.shared)

    @property
    def shared_spread(self) -> tuple[float, float]:
        return min(t.rate_limit for t in self.shared), max(t.rate_limit for t in self.shared)

    @property
    def shared_throttled(self) -> int:
        return sum(t.throttled for t in self.shared)

    @property
    def per_process_rate(self) -> float:
        return statistics.mean(t.rate_limit for t in self.per_process)

    @property
    def per_process_spread(self) -> tuple[float, float]:
        rates = [t.rate_limit for t in self.per_process]
        return min(rates), max(rates)

    @property
    def per_process_throttled(self) -> int:
        return sum(t.throttled for t in self.per_process)


def trial(
    tmp: Path,
    processes: int,
    groups: int,
    rate: int,
    limiter: str | None,
    tree: Path | None = None,
) -> Trial:
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
                procs.append(
                    subprocess.Popen(
                        cmd,
                        env=env,
                        cwd=tree,  # `python -m` takes the worker from the working directory
                        stdout=subprocess.DEVNULL,
                        stderr=err,
                    )
                )
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
            stats.update({k: float(event.get(k, 0)) for k in STATS})
            rtts.append(float(event.get("redis_rtt_ms", 0.0)))
    span = ok[-1] - ok[0] if len(ok) > 1 else float("nan")
    target = rate * (1 - DEFAULT_HEADROOM)
    return Trial(
        rate_limit=(len(ok) - 1) / span / rate if len(ok) > 1 else float("nan"),
        throttled=sum(1 for a in arrivals if a["code"] == "FlowLimitExceeded"),
        max_per_s=max_in_window([a["t"] for a in arrivals]),
        created=len(ok),
        behind_ms=1000 * (span - (len(ok) - 1) / target),
        stats=dict(stats),
        rtt_ms=statistics.mean(rtts) if rtts else float("nan"),
    )


def measure(
    processes: Sequence[int],
    runs: int = 1,
    *,
    groups: int = 240,
    rate: int = 20,
    redis: str = DEFAULT_REDIS,
    on_trial: Callable[[int, Trial, Trial], None] | None = None,
    tree: Path | None = None,
) -> list[Row]:
    """One Row per N in `processes`, each with `runs` shared and per-process trials. Runs are
    interleaved (every N once, then again), so that a noisy minute hits every N alike;
    `on_trial(n, shared, per_process)` hears of each pair as it finishes."""
    done: dict[int, list[tuple[Trial, Trial]]] = {n: [] for n in processes}
    with tempfile.TemporaryDirectory() as d:
        for _ in range(runs):
            for n in processes:
                shared = trial(Path(d), n, groups, rate, redis, tree)
                alone = trial(Path(d), n, groups, rate, None, tree)
                done[n].append((shared, alone))
                if on_trial is not None:
                    on_trial(n, shared, alone)
    return [
        Row(
            processes=n,
            shared=tuple(s for s, _ in pairs),
            per_process=tuple(a for _, a in pairs),
        )
        for n, pairs in done.items()
    ]


def print_trial(n: int, shared: Trial, alone: Trial) -> None:
    s = Counter(shared.stats)  # a process that died before its last line left no stats
    print(
        f"{n:>2}  {shared.rate_limit:>18.3f}{shared.throttled:>10}{shared.max_per_s:>7}"
        f"{shared.behind_ms:>8.0f}   {alone.rate_limit:>23.3f}{alone.throttled:>10}"
        f"{alone.max_per_s:>7}   {s['reported_late']:>12.0f}{s['stalled']:>8.0f}"
        f"{s['late_ms']:>8.0f}{s['missed']:>6.0f}{s['refused']:>9.0f}"
        f"{s['redis_calls']:>13.0f} ({shared.rtt_ms:.2f})",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=240)
    parser.add_argument("--rate", type=int, default=20)
    parser.add_argument("--processes", default="1,3,6")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--redis", default=DEFAULT_REDIS)
    parser.add_argument("--base", type=Path, help="then the same with this tree's worker (today)")
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]
    print(
        f"{args.groups} groups split over N processes, one AK, strict sandbox at "
        f"{args.rate}/s, latency 20-200 ms; a perfect pacer at a fixed {DEFAULT_HEADROOM:.0%} "
        f"scores {1 - DEFAULT_HEADROOM:.3f}; goal (issue 20): 3 processes shared >= 0.980, "
        "0 throttles; `behind` counts against the starting 3 %"
    )
    for name, tree in [("this", None), *([("today", args.base.resolve())] if args.base else [])]:
        print(f"-- {name} tree{f' ({tree})' if tree else ''}, load {os.getloadavg()[0]:.1f}")
        _measure_and_print(args, counts, tree)


def _measure_and_print(args: argparse.Namespace, counts: list[int], tree: Path | None) -> None:
    print(
        f"{'N':>2}  {'shared: rate/limit':>18}{'throttled':>10}{'max/s':>7}{'behind':>8}"
        f"   {'per-process: rate/limit':>23}{'throttled':>10}{'max/s':>7}"
        f"   shared: late stalled late ms  lost  refused  redis calls (ms)"
    )
    rows = measure(
        counts,
        args.runs,
        groups=args.groups,
        rate=args.rate,
        redis=args.redis,
        on_trial=print_trial,
        tree=tree,
    )
    if args.runs > 1:
        print(f"over {args.runs} runs: mean rate/limit (min-max), throttled in all runs")
        for row in rows:
            lo, hi = row.shared_spread
            plo, phi = row.per_process_spread
            print(
                f"{row.processes:>2}  shared {row.shared_rate:.3f} ({lo:.3f}-{hi:.3f})"
                f" {row.shared_throttled:>3}   per-process {row.per_process_rate:.3f}"
                f" ({plo:.3f}-{phi:.3f}) {row.per_process_throttled:>3}"
            )


if __name__ == "__main__":
    main()
