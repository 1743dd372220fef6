"""Benchmark rows of `bench.sync` for issue 20 item 3: List pages at the rate.

4. A listing of 100 000 groups (100 pages) by `sync --dry-run` at 10/s, the sandbox
   answering in 20-50 ms and in 100-300 ms: List requests per second (first arrival to
   last, counted by the sandbox), beside the rate the goal asks for and the floor
   (100 pages / rate).
5. A 1 % drift sync of 100 000 groups (the account lacks 500 and holds 500 with other
   tags): wall time beside its floor, the requests the sandbox counted / rate.

`--today PATH` runs each row with the worker of the source tree at PATH too (a checkout
of the code before the change: `git archive <commit> | tar -x -C PATH`), against the same
sandbox code, so that each figure prints beside today's.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench import sync_measure as base

GOAL_RATE = 0.9  # List requests arrive at >= 0.9 of the rate
GOAL_FLOOR = 1.05  # the drift sync within 1.05 x its floor
LATENCIES = ("20-50", "100-300")


def with_code(env: dict[str, str], tree: Path | None) -> dict[str, str]:
    """`env` for a worker child that imports `worker` from `tree` (None: this checkout)."""
    if tree is None:
        return env
    return {
        **env,
        "PYTHONPATH": os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH")) if p),
    }


def list_rate(m: base.Measured) -> float:
    """List requests per second, first arrival to last (the sandbox's clock)."""
    pages = m.actions.get("List", 0)
    return (pages - 1) / m.span_s if m.span_s > 0 else 0.0


def row_listing(tmp: Path, env: dict[str, str], size: int, rate: float, today: Path | None) -> None:
    folder = tmp / "listing"
    folder.mkdir()
    manifest = base.write(folder / "m.jsonl", (base.group(i, f"b{i % 7}") for i in range(size)))
    pages = -(-size // 1000)
    print(
        f"### 4. Listing {base.n(size)} groups ({pages} pages) at {rate:g}/s\n\n"
        f"`worker sync m.jsonl --dry-run --rate {rate:g}` against `worker sandbox --rate "
        f"{rate:g} --preload m.jsonl --latency-ms A-B`; List requests per second from the "
        f"sandbox's arrival log (first to last). Goal: ≥ {GOAL_RATE * rate:g}/s "
        f"({GOAL_RATE:g} of the rate); floor {pages / rate:.1f} s.\n"
    )
    rows = []
    for latency in LATENCIES:
        cells = []
        for code in (today, None) if today is not None else (None,):
            with base.account(folder, rate, manifest, "--latency-ms", latency) as sb:
                m = base.worker(
                    folder,
                    with_code(env, code),
                    sb,
                    rate,
                    "sync",
                    "m.jsonl",
                    "--dry-run",
                    "--ledger",
                    f"l-{latency}-{'today' if code else 'now'}.jsonl",
                )
            got = list_rate(m)
            cells.append(
                f"**{got:.2f}/s** ({got / rate:.3f} of the rate), List {m.actions.get('List', 0)}"
                f" in {m.span_s:.1f} s, wall {m.wall_s:.1f} s, exit {m.code}"
            )
        if today is None:
            cells.insert(0, "not measured")
        rows.append(
            f"| {latency} ms | {cells[0]} | {cells[1]} | ≥ {GOAL_RATE * rate:g}/s; "
            f"{pages} pages in {pages / rate:.0f} s |"
        )
    base.table("| server answers in | today | now | goal; floor |", rows)


def row_drift(
    tmp: Path, env: dict[str, str], size: int, rate: float, today: Path | None, latency: str
) -> None:
    folder = tmp / f"drift-1pc-{latency}"
    folder.mkdir()
    missing = retagged = size // 200
    base.write(folder / "m.jsonl", (base.group(i, f"b{i % 7}") for i in range(size)))
    preload = base.write(
        folder / "account.jsonl",
        (
            base.group(i, "other" if i < missing + retagged else f"b{i % 7}")
            for i in range(missing, size)
        ),
    )
    print(
        f"### 5. A 1 % drift sync of {base.n(size)} groups at {rate:g}/s, "
        f"answers in {latency} ms\n\n"
        f"`worker sync m.jsonl --rate {rate:g}` against `worker sandbox --rate {rate:g} "
        f"--preload account.jsonl --latency-ms {latency}`: the account lacks {base.n(missing)} "
        f"and holds {base.n(retagged)} with other tags. Floor = the requests the sandbox "
        f"counted / rate; goal: wall ≤ {GOAL_FLOOR:g} × floor.\n"
    )
    rows = []
    for label, code in (("today", today), ("now", None)):
        if label == "today" and today is None:
            continue
        with base.account(folder, rate, preload, "--latency-ms", latency) as sb:
            m = base.worker(
                folder,
                with_code(env, code),
                sb,
                rate,
                "sync",
                "m.jsonl",
                "--ledger",
                f"drift-{label}.jsonl",
            )
        floor = m.requests / rate
        rows.append(
            f"| {label} | {base.requests(m)} | {floor:.1f} s | {base.wall(m)} | "
            f"**{m.wall_s / floor:.3f} ×** (requests' span {m.span_s / floor:.3f} ×) | "
            f"≤ {GOAL_FLOOR:g} × | {m.code} |"
        )
    base.table(
        "| code | requests (sandbox log) | floor | wall | wall / floor | goal | exit |", rows
    )
