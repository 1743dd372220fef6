"""Benchmark: `sync` vs `run` (issue 9), requests counted by the sandbox, the real CLI in children.

    python -m bench.sync                  # the issue's sizes (about 90 s on 2 cores)
    python -m bench.sync --quick          # smaller sizes: a smoke check
    python -m bench.sync --rate 10 --fast-rate 100
    python -m bench.sync --only listing,drift --today /tmp/before   # issue 20 item 3

Every figure comes from `python -m worker ...` run as a user runs it, against a sandbox
process (`python -m worker sandbox --rate R --preload ACCOUNT --log ARRIVALS`) holding the
account, each command with a fresh ledger (the "ledger deleted" case). Requests are counted
per action from the sandbox's arrival log, never from the worker; wall time runs from the
child's start to its exit (interpreter start included); peak RSS is the kernel's ru_maxrss
of that child alone (`os.wait4`).

1. An account that already holds all of the manifest's groups: `sync` at --rate (the
   account's limit, 10/s by default, sandbox and worker alike) and, for the same account,
   `run`. `run` sends one create per Name, so at 10/s it is measured at --fast-rate instead
   and its time at --rate is projected (labelled so): the measured start-up and tail plus
   the requests spread at the worker's own target (the limit less its headroom).
2. A manifest of which the account holds all but some, and holds some with other tags:
   `sync` (one List, the creates, the updates) beside `run` (a create per Name).
3. Memory: `validate`, `run --dry-run` and `sync --dry-run` of one large manifest, the
   sync against an account that holds every one of its groups (a listing as large as the
   manifest), sandbox and worker at --fast-rate (a hundred List pages at 10/s would be
   ten seconds of waiting and nothing else).
4. and 5. (bench.sync_listing): List pages per second at two latencies, and a 1 % drift
   sync of 100 000 groups beside its floor, each beside today's code with --today.

Not part of the test suite (tests/test_sync_e2e.py asserts the behaviour).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from bench import sync_listing
from bench.sync_measure import (
    AK,
    SK,
    Measured,
    account,
    group,
    n,
    requests,
    table,
    wall,
    worker,
    write,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Sizes:
    in_sync: int  # row 1: groups in the manifest and the account alike
    listed: int  # row 2: groups in the manifest
    missing: int  # row 2: of those, absent from the account
    retagged: int  # row 2: of those, in the account with other tags
    large: int  # row 3: manifest lines and account groups


DEFAULT = Sizes(in_sync=2000, listed=1000, missing=100, retagged=50, large=100_000)
QUICK = Sizes(in_sync=1100, listed=200, missing=20, retagged=10, large=10_000)


class Terminated(Exception):
    """SIGTERM, turned into an exception so that every `finally` below runs."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def timing_row(m: Measured) -> str:
    return f"| `{m.shown}` | {m.rate:g} | {requests(m)} | {wall(m)} | {m.code} |"


def once(folder: Path, env: dict[str, str], preload: Path, rate: float, *args: str) -> Measured:
    """One command against its own fresh account (a sync changes it: no one inherits that)."""
    with account(folder, rate, preload) as sb:
        return worker(folder, env, sb, rate, *args)


def compare(folder: Path, env: dict[str, str], preload: Path, rate: float, fast: float) -> None:
    """`sync` and `run` of folder/m.jsonl, ledger-less, side by side: both at `rate`, or, when
    `fast` is higher, sync at `rate`, both at `fast`, and run's time at `rate` projected."""

    def fresh(command: str, at: float) -> tuple[str, ...]:
        # A ledger per command and rate: no command resumes another's ledger (the "ledger
        # deleted" case), and a ledger is bound to its target, i.e. to one sandbox.
        return (command, "m.jsonl", "--ledger", f"{command}-{at:g}.ledger.jsonl")

    got = [timing_row(once(folder, env, preload, rate, *fresh("sync", rate)))]
    if fast <= rate:
        got.append(timing_row(once(folder, env, preload, rate, *fresh("run", rate))))
    else:
        got.append(timing_row(once(folder, env, preload, fast, *fresh("sync", fast))))
        ran = once(folder, env, preload, fast, *fresh("run", fast))
        got.append(timing_row(ran))
        at_rate = ran.shown.replace(f"-{fast:g}.ledger", f"-{rate:g}.ledger").replace(
            f"--rate {fast:g}", f"--rate {rate:g}"
        )
        got.append(
            f"| `{at_rate}` | {rate:g} "
            f"| {n(ran.requests)}, as above | **projected** from the {fast:g}/s run: "
            f"{ran.projected_s(rate):.0f} s | |"
        )
    table("| command | rate/s | requests (sandbox log) | wall | exit |", got)


def row_in_sync(tmp: Path, env: dict[str, str], size: int, rate: float, fast: float) -> None:
    folder = tmp / "in-sync"
    folder.mkdir()
    manifest = write(folder / "m.jsonl", (group(i, f"b{i % 7}") for i in range(size)))
    print(
        f"### 1. Ledger deleted, the account already holds the manifest's {n(size)} groups\n\n"
        "Each command against its own `worker sandbox --rate R --preload m.jsonl`.\n"
    )
    compare(folder, env, manifest, rate, fast)


def row_drift(tmp: Path, env: dict[str, str], sizes: Sizes, rate: float, fast: float) -> None:
    folder = tmp / "drift"
    folder.mkdir()
    total, missing, retagged = sizes.listed, sizes.missing, sizes.retagged
    write(folder / "m.jsonl", (group(i, f"b{i % 7}") for i in range(total)))
    # The account: every group but the first `missing`, the next `retagged` with other tags.
    preload = write(
        folder / "account.jsonl",
        (
            group(i, "other" if i < missing + retagged else f"b{i % 7}")
            for i in range(missing, total)
        ),
    )
    print(
        f"### 2. Ledger deleted, a manifest of {n(total)}: the account lacks {n(missing)} "
        f"and holds {n(retagged)} with other tags\n\n"
        f"Each command against its own `worker sandbox --rate R --preload account.jsonl` "
        f"({n(total - missing)} groups). `run` only creates: its {n(retagged)} stay wrong.\n"
    )
    compare(folder, env, preload, rate, fast)


def row_memory(tmp: Path, env: dict[str, str], size: int, rate: float) -> None:
    folder = tmp / "memory"
    folder.mkdir()
    manifest = write(folder / "m.jsonl", (group(i, f"b{i % 7}") for i in range(size)))
    got: list[str] = []
    rss: dict[str, float] = {}
    with account(folder, rate, manifest) as sb:
        for args in (
            ("validate", "m.jsonl"),
            ("run", "m.jsonl", "--dry-run", "--ledger", "run.ledger.jsonl"),
            ("sync", "m.jsonl", "--dry-run", "--ledger", "sync.ledger.jsonl"),
        ):
            m = worker(folder, env, sb, rate, *args)
            rss[args[0]] = m.rss_mb
            got.append(
                f"| `{m.shown}` | **{m.rss_mb:.0f} MB** | {wall(m)} | {requests(m)} | {m.code} |"
            )
    print(
        f"### 3. Peak RSS: a {n(size)}-line manifest, and a listing of {n(size)} groups\n\n"
        f"Sandbox: `worker sandbox --rate {rate:g} --preload m.jsonl` (every manifest group "
        f"exists); sandbox and worker at {rate:g}/s for this row, not the account's 10/s.\n"
    )
    table("| command | peak RSS | wall | requests (sandbox log) | exit |", got)
    extra = rss["sync"] - rss["run"]  # both hold the manifest's Names; sync also the listing
    print(
        f"The listing costs sync {extra:.0f} MB over `run --dry-run`: "
        f"{extra * 2**20 / size:.0f} bytes per listed group.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a smoke check")
    parser.add_argument(
        "--rate", type=float, default=10.0, help="the account's limit: sandbox and worker (10)"
    )
    parser.add_argument(
        "--fast-rate",
        type=float,
        default=100.0,
        help="the rate `run` is measured at when --rate is lower, and row 3's rate (100)",
    )
    parser.add_argument(
        "--only",
        default="compare,memory,listing,drift",
        help="sections, comma-separated: compare (rows 1-2), memory (3), listing (4), drift (5)",
    )
    parser.add_argument(
        "--today",
        type=Path,
        help="a source tree of the code before the change: rows 4-5 run its worker too",
    )
    parser.add_argument(
        "--drift-latency",
        default="20-50,100-300",
        help="the sandbox's --latency-ms for row 5, comma-separated (20-50,100-300)",
    )
    opts = parser.parse_args()
    only = set(opts.only.split(","))
    if unknown := only - {"compare", "memory", "listing", "drift"}:
        parser.error(f"--only: unknown sections {sorted(unknown)}")
    if opts.today is not None and not (opts.today / "worker" / "__main__.py").is_file():
        parser.error(f"--today {opts.today}: no worker/__main__.py there")
    if opts.rate <= 0 or opts.fast_rate <= 0:
        parser.error("rates must be positive")
    sizes = QUICK if opts.quick else DEFAULT
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOLC_", "WORKER_"))}
    signal.signal(signal.SIGTERM, _on_sigterm)
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as d:
        tmp = Path(d)
        # HOME in the temp folder: no ~/.volc file of the user's can take part.
        env.update(HOME=d, VOLC_ACCESSKEY=AK, VOLC_SECRETKEY=SK)
        print(f"`{shlex.join(['python', '-m', 'bench.sync', *sys.argv[1:]])}`\n")
        try:
            if "compare" in only:
                row_in_sync(tmp, env, sizes.in_sync, opts.rate, opts.fast_rate)
                row_drift(tmp, env, sizes, opts.rate, opts.fast_rate)
            if "memory" in only:
                row_memory(tmp, env, sizes.large, opts.fast_rate)
            today = opts.today.resolve() if opts.today is not None else None
            if "listing" in only:
                sync_listing.row_listing(tmp, env, sizes.large, opts.rate, today)
            if "drift" in only:
                for latency in opts.drift_latency.split(","):
                    sync_listing.row_drift(tmp, env, sizes.large, opts.rate, today, latency)
        except (KeyboardInterrupt, Terminated):
            print("interrupted: children stopped, temp folder removed", file=sys.stderr)
            sys.exit(130)


if __name__ == "__main__":
    main()
