"""Benchmark: the rate held against server latency, and the in-flight cap (issue 11).

    python -m bench.latency [--runs 1] [--base /work/wt/base] [--only headroom|throttle|latency]

Each case runs `python -m worker run` as a user runs it (no flag but --rate, unless the case
names --concurrency) against its own strict sandbox process (sliding 1-second window at the
limit, answers delayed by a uniform latency). Figures come from the sandbox's arrival log, as
in bench.pacing: rate/limit (successful creates per second between the first and the last
arrival, over the limit) and FlowLimitExceeded answers. The in-flight figure comes from the
worker's ledger: the most items between their intent (written just before the send) and
their result (written after the answer), so it bounds what was on the wire from above.
`max/s (sent)`: the most arrivals in any sliding second, and in brackets the most intents
(the client's sends): when only the first passes the limit, a loaded machine bunched the
requests on their way (see the load column), the pacer did not.

    latency 20-2000 ms at limit 10 and 50     goal: rate/limit 0.97 (>= 0.965), 0 throttles
    latency 2-4 s at limit 10 and 50          goal: rate/limit >= 0.96, default --concurrency
    latency 2-4 s at limit 50, --concurrency 20  in flight never above 20

Issue 20 (`--only headroom`, `--only throttle`; `--base TREE` runs the same case with the
worker found in TREE too, "today", interleaved run by run):

    latency 20-400 ms at limit 10 and 100      goal: rate/limit >= 0.985, 0 throttles
    one 429 with Retry-After: 1 at limit 10    goal: costs <= 2 s over a clean run

The lone throttle comes from a proxy in front of a sandbox whose own limit is far above the
worker's --rate (so nothing else throttles): it answers the 40th create 429 FlowLimitExceeded
with Retry-After: 1 and forwards every other request. Its cost is the span of the successful
creates (first to last arrival) less the span of a clean run through the same proxy.

Little's law says what the default must allow: at 50/s and 3 s on average, 150 requests
are on the wire; the cap (--concurrency 20) then bounds the rate to about 20 / 3 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from bench.harness import SandboxProc, max_in_window, start_sandbox
from bench.throttle_proxy import ThrottleProxy

AK, SK = "AKBENCHLAT", "SKbenchLATsecret"


@dataclass(frozen=True, slots=True, kw_only=True)
class Case:
    """One configuration: the sandbox's limit and latency, the worker's flags."""

    limit: int
    latency_ms: str  # "A-B", uniform
    groups: int
    concurrency: int | None = None  # None: the worker's default (follows latency)
    goal: float | None = None  # rate/limit to reach, when the case has one
    throttle_at: int | None = None  # answer this create 429 Retry-After: 1 (through a proxy)

    @property
    def label(self) -> str:
        cap = f"--concurrency {self.concurrency}" if self.concurrency else "default"
        lone = f", create #{self.throttle_at} answered 429" if self.throttle_at else ""
        return f"limit {self.limit}/s, latency {self.latency_ms} ms, {cap}{lone}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    """What one run of one case achieved."""

    case: Case
    rate_limit: float  # successful creates per second (first to last arrival) / limit
    throttles: int  # FlowLimitExceeded answers
    max_per_s: int  # most arrivals in any sliding second (the sandbox's own rule)
    sent_max_per_s: int  # most intents in any sliding second: the client's side of the same
    max_in_flight: int  # most items between intent and result (the ledger's view)
    created: int
    wall_s: float
    load: float  # the machine's 1-minute load average after the run: > cores means noisy
    span_s: float  # first to last successful create

    @property
    def ok(self) -> bool:
        """The case's goal held: rate, no throttle, never above an explicit cap."""
        if self.throttles:
            return False
        if self.case.concurrency is not None and self.max_in_flight > self.case.concurrency:
            return False
        return self.case.goal is None or self.rate_limit >= self.case.goal


CASES: tuple[Case, ...] = (
    Case(limit=10, latency_ms="20-2000", groups=200, goal=0.965),
    Case(limit=50, latency_ms="20-2000", groups=750, goal=0.965),
    Case(limit=10, latency_ms="2000-4000", groups=200, goal=0.96),
    Case(limit=50, latency_ms="2000-4000", groups=750, goal=0.96),
    Case(limit=50, latency_ms="2000-4000", groups=100, concurrency=20),
)
HEADROOM: tuple[Case, ...] = (
    Case(limit=10, latency_ms="20-400", groups=300, goal=0.985),
    Case(limit=100, latency_ms="20-400", groups=3000, goal=0.985),
)
# A clean run and the same run with one 429: the difference is what the 429 cost.
THROTTLE: tuple[Case, ...] = (
    Case(limit=10, latency_ms="20-200", groups=150),
    Case(limit=10, latency_ms="20-200", groups=150, throttle_at=40),
)


def measure(cases: tuple[Case, ...] = CASES, runs: int = 1, tree: Path | None = None) -> list[Row]:
    """Run every case `runs` times (interleaved, so a noisy minute hits every case), with
    the worker of `tree` (None: this one)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp_name:
        tmp = Path(tmp_name)
        for _ in range(runs):
            for case in cases:
                rows.append(_run(tmp, case, tree))
    return rows


def _run(tmp: Path, case: Case, tree: Path | None = None) -> Row:
    # A lone-throttle case: the sandbox's own limit is far above --rate, the proxy throttles.
    limit = case.limit * 20 if case.throttle_at else case.limit
    sb = start_sandbox(tmp, "--rate", str(limit), "--latency-ms", case.latency_ms, keys={AK: SK})
    proxy = ThrottleProxy(sb.url, case.throttle_at) if case.throttle_at else None
    try:
        url = proxy.start() if proxy else sb.url
        manifest = tmp / f"latency-{time.monotonic_ns()}.jsonl"  # a fresh ledger every run
        manifest.write_text(
            "".join(json.dumps({"Name": f"L{i:06d}"}) + "\n" for i in range(case.groups))
        )
        ledger = manifest.with_name(manifest.stem + ".ledger.jsonl")
        cmd = [sys.executable, "-m", "worker", "run", str(manifest), "--ledger", str(ledger)]
        cmd += ["--endpoint", url, "--rate", str(case.limit), "--quiet"]
        if case.concurrency is not None:
            cmd += ["--concurrency", str(case.concurrency)]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VOLC", "WORKER_"))}
        env.update(HOME=str(tmp), VOLC_ACCESSKEY=AK, VOLC_SECRETKEY=SK)
        if tree is not None:  # that tree's worker package before this one's
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
        started = time.monotonic()
        subprocess.run(
            cmd,
            env=env,
            cwd=tree,  # `python -m` puts the working directory first on sys.path
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wall = time.monotonic() - started
        return _row(case, sb, ledger, wall)
    finally:
        if proxy:
            proxy.stop()
        sb.stop()


def _row(case: Case, sb: SandboxProc, ledger: Path, wall: float) -> Row:
    arrivals = sb.creates()
    ok = sorted(a["t"] for a in arrivals if a["code"] == "")
    span = ok[-1] - ok[0] if len(ok) > 1 else 0.0
    return Row(
        case=case,
        rate_limit=(len(ok) - 1) / span / case.limit if span > 0 else float("nan"),
        throttles=sum(1 for a in arrivals if a["code"] == "FlowLimitExceeded"),
        max_per_s=max_in_window([a["t"] for a in arrivals]),
        sent_max_per_s=max_in_window(intent_times(ledger)),
        max_in_flight=max_in_flight(ledger),
        created=len(ok),
        wall_s=wall,
        load=os.getloadavg()[0],
        span_s=span,
    )


def intent_times(ledger: Path) -> list[float]:
    """When each request was about to go out (its intent's stamp), in epoch seconds. When the
    sandbox saw more in one second than the client sent, the bunching happened in between
    (a loaded machine delaying some requests and not others), not in the pacer."""
    if not ledger.exists():
        return []
    return [
        datetime.fromisoformat(record["at"].replace("Z", "+00:00")).timestamp()
        for record in map(json.loads, ledger.read_text(encoding="utf-8").splitlines())
        if record.get("type") == "intent"
    ]


def max_in_flight(ledger: Path) -> int:
    """The most items between their intent and their result, from the ledger's stamps.
    Stamps are milliseconds: at a tie a result counts before an intent (a slot that frees
    and is taken again in the same millisecond was not two requests at once)."""
    events: list[tuple[str, int]] = []
    if not ledger.exists():
        return 0
    for line in ledger.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("type") == "intent":
            events.append((record["at"], 1))
        elif record.get("type") == "result" and record.get("sends"):
            events.append((record["finished"], -1))
    best = now = 0
    for _, delta in sorted(events):  # ISO stamps sort as times; -1 before +1 at a tie
        now += delta
        best = max(best, now)
    return best


SETS = {"latency": CASES, "headroom": HEADROOM, "throttle": THROTTLE}


def _print_row(tree: str, row: Row) -> None:
    case = row.case
    if case.goal:
        goal = f">= {case.goal:.3f} {'ok' if row.ok else 'MISSED'}"
    elif case.concurrency:
        goal = f"in flight <= {case.concurrency} {'ok' if row.ok else 'MISSED'}"
    else:
        goal = "-"
    print(
        f"| {case.label} | {tree} | {row.rate_limit:.3f} | {goal} | {row.throttles} "
        f"| {row.max_per_s} ({row.sent_max_per_s}) | {row.max_in_flight} | {row.created} "
        f"| {row.span_s:.2f} s | {row.wall_s:.1f} s | {row.load:.1f} |",
        flush=True,
    )


def _print_costs(rows: list[tuple[str, Row]]) -> None:
    """The lone throttle's cost per tree: span with the 429 less the clean span, per run."""
    for tree in dict.fromkeys(t for t, _ in rows):
        clean = [r.span_s for t, r in rows if t == tree and not r.case.throttle_at]
        hit = [r.span_s for t, r in rows if t == tree and r.case.throttle_at]
        costs = [h - c for c, h in zip(clean, hit, strict=False)]
        if costs:
            shown = ", ".join(f"{c:.2f}" for c in costs)
            verdict = "ok" if max(costs) <= 2.0 else "MISSED"
            print(f"one 429 (Retry-After: 1) cost, {tree}: {shown} s (goal <= 2 s: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--only", choices=[*SETS, "all"], default="latency")
    parser.add_argument("--base", type=Path, help="also run the worker of this tree (today)")
    args = parser.parse_args()
    cases = sum(SETS.values(), ()) if args.only == "all" else SETS[args.only]
    trees: list[tuple[str, Path | None]] = [("this", None)]
    if args.base:
        trees.append(("today", args.base.resolve()))
    base = f" --base {args.base}" if args.base else ""
    print(f"python -m bench.latency --runs {args.runs} --only {args.only}{base}")
    print(
        "| case | tree | rate/limit | goal | throttles | max/s (sent) | max in flight | created "
        f"| span | wall | load ({os.cpu_count()} cores) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows: list[tuple[str, Row]] = []
    for _ in range(args.runs):
        for case in cases:
            for name, tree in trees:
                row = measure((case,), tree=tree)[0]
                rows.append((name, row))
                _print_row(name, row)
    _print_costs(rows)
    if args.runs > 1:
        print(f"over {args.runs} runs: mean rate/limit (min-max), throttles in all runs")
        for case in cases:
            for name, _ in trees:
                r = [row.rate_limit for t, row in rows if row.case == case and t == name]
                n = sum(row.throttles for t, row in rows if row.case == case and t == name)
                mean, lo, hi = statistics.mean(r), min(r), max(r)
                print(f"| {case.label} | {name} | {mean:.3f} ({lo:.3f}-{hi:.3f}) | {n} |")


if __name__ == "__main__":
    main()
