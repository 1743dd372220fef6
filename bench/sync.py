"""Benchmark: `sync` vs `run` (issue 9), requests counted by the sandbox, the real CLI in children.

    python -m bench.sync                  # the issue's sizes (about 90 s on 2 cores)
    python -m bench.sync --quick          # smaller sizes: a smoke check
    python -m bench.sync --rate 10 --fast-rate 100

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

Not part of the test suite (tests/test_sync_e2e.py asserts the behaviour).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

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
class Sizes:
    in_sync: int  # row 1: groups in the manifest and the account alike
    listed: int  # row 2: groups in the manifest
    missing: int  # row 2: of those, absent from the account
    retagged: int  # row 2: of those, in the account with other tags
    large: int  # row 3: manifest lines and account groups


DEFAULT = Sizes(in_sync=2000, listed=1000, missing=100, retagged=50, large=100_000)
QUICK = Sizes(in_sync=1100, listed=200, missing=20, retagged=10, large=10_000)


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


class Terminated(Exception):
    """SIGTERM, turned into an exception so that every `finally` below runs."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated


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
def account(tmp: Path, rate: float, preload: Path) -> Iterator[SandboxProc]:
    """A sandbox process at `rate` holding the groups of `preload`, stopped on the way out."""
    sb = start_sandbox(tmp, "--rate", f"{rate:g}", "--preload", str(preload), keys={AK: SK})
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
    opts = parser.parse_args()
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
            row_in_sync(tmp, env, sizes.in_sync, opts.rate, opts.fast_rate)
            row_drift(tmp, env, sizes, opts.rate, opts.fast_rate)
            row_memory(tmp, env, sizes.large, opts.fast_rate)
        except (KeyboardInterrupt, Terminated):
            print("interrupted: children stopped, temp folder removed", file=sys.stderr)
            sys.exit(130)


if __name__ == "__main__":
    main()
