"""Benchmark: every figure of issue 11 in one run, the real CLI in child processes.

    python -m bench.scale            # every section, 10^6 lines (~20 min on 2 cores)
    python -m bench.scale --quick    # 10^5 lines, the shorter cases: a smoke run
    python -m bench.scale --full     # also 10^7 lines (dry run and resume; ~10 GB of temp files)
    python -m bench.scale --only memory,cpu --runs 3
    python -m bench.scale --only rebuilds --baseline /tmp/old   # beside `git archive` of it

Sections (`--only`): `rebuilds` (a resume and an all-done rerun at 10^6 lines with nothing
remembered, beside another worker tree given with --baseline), `latency` (bench.latency: the
rate held against slow servers at the default --concurrency), `shared` (bench.shared: N
processes on one Redis budget, beside N private budgets), `cpu` (bench.cpu: client CPU per
request beside a bare aiohttp + signer loop), `memory` (a 1-line run, and peak RSS and time at
10^6 / 10^7 lines), `listing` (`sync` and `export` over 3·10^5 and 10^6 listed groups: peak
RSS and time beside the listing's floor; `--quick`: 3·10^4).

The memory rows run `python -m worker ...` as a user would, in a temporary directory, and
read the child's own peak RSS from `os.wait4` (the kernel's ru_maxrss of that process alone)
and its wall time. Manifests and ledgers are generated from byte templates (the ledger lines
are what the worker writes: an intent and a `created` result per done Name, fingerprints the
sha256 of the canonical body), for a target that is the sandbox process the runs talk to.
Such a ledger looks written by an older worker (no index, no remembered validation), so the
first run over it builds both; the realistic rows are the ones after a real run left them.
Time to the first request is the sandbox's first arrival minus the moment the child was
started. Every row prints this project's figure beside the goal of the issue.

Not part of the test suite (tests/test_scale.py asserts the behaviour).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from bench.harness import SandboxProc, start_sandbox

AK, SK = "AKSCALE", "SKscalesecret"
RUN_ID = "0" * 32


@dataclass(frozen=True, slots=True)
class Measured:
    rss_mb: float
    wall_s: float
    code: int
    first_request_s: float | None = None


def name(i: int) -> str:
    return f"组{i:08d}"


def line(i: int) -> bytes:
    # Exactly orjson's canonical body (the manifest step's), so fingerprints match.
    return (
        f'{{"Name":"{name(i)}","ProjectName":"default","Tags":[{{"Key":"批次",'
        f'"Value":"b{i % 7}","Category":"Custom"}}]}}'
    ).encode()


def generate(folder: Path, lines: int, done: int, endpoint: str) -> tuple[Path, Path]:
    """A manifest of `lines` groups and a ledger in which the first `done` are created."""
    manifest, ledger = folder / "m.jsonl", folder / "m.ledger.jsonl"
    with manifest.open("wb", buffering=1 << 20) as f:
        for i in range(lines):
            f.write(line(i) + b"\n")
    stamp = "2024-01-01T00:00:00.000Z"
    header = (
        f'{{"type":"run","run_id":"{RUN_ID}","started":"{stamp}","version":"0.1.0",'
        f'"command":"run","target":{{"endpoint":"{endpoint}","region":"cn-north-1",'
        f'"access_key":"{AK}"}},"manifest":"{manifest}","manifest_sha256":"{"0" * 64}",'
        f'"items":{lines},"plan":{{"new":{lines}}},"settings":{{}}}}\n'
    ).encode()
    with ledger.open("wb", buffering=1 << 20) as f:
        f.write(header)
        for i in range(done):
            body = line(i)
            fp = hashlib.sha256(body).hexdigest()
            n = name(i)
            f.write(
                f'{{"type":"intent","run_id":"{RUN_ID}","action":"create","name":"{n}",'
                f'"line":{i + 1},"fingerprint":"{fp}","attempt":1,"at":"{stamp}","body":'.encode()
                + body
                + b"}\n"
            )
            f.write(
                f'{{"type":"result","run_id":"{RUN_ID}","action":"create","name":"{n}",'
                f'"outcome":"created","status":200,"code":"","message":"",'
                f'"request_id":"r{i}","sends":1,"fingerprint":"{fp}","line":{i + 1},'
                f'"started":"{stamp}","finished":"{stamp}"}}\n'.encode()
            )
    return manifest, ledger


def child(
    args: list[str],
    *,
    env: dict[str, str],
    sandbox: SandboxProc | None = None,
    stop_after_first_s: float | None = None,
    stop_with: signal.Signals = signal.SIGTERM,
    cwd: Path | None = None,
) -> Measured:
    """Run `python -m worker ARGS`; with `stop_after_first_s`, send it `stop_with` that long
    after the sandbox saw its first request (a resume is measured until it is sending
    steadily)."""
    before = len(sandbox.creates()) if sandbox is not None else 0  # earlier runs' arrivals
    started_wall, started = time.time(), time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", *args],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first: float | None = None
    while stop_after_first_s is not None and sandbox is not None and proc.poll() is None:
        arrivals = sandbox.creates()[before:] if first is None else []
        if first is None and arrivals:
            first = arrivals[0]["t"] - started_wall
            deadline = time.monotonic() + stop_after_first_s
        if first is not None and time.monotonic() >= deadline:
            proc.send_signal(stop_with)
            break
        time.sleep(0.05)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Measured(
        rss_mb=usage.ru_maxrss / 1024,
        wall_s=time.monotonic() - started,
        code=proc.returncode,
        first_request_s=first,
    )


def row(figure: str, got: str, goal: str) -> None:
    print(f"| {figure} | {got} | {goal} |", flush=True)


def scale(
    folder: Path,
    lines: int,
    sb: SandboxProc,
    env: dict[str, str],
    label: str,
    *,
    all_done: bool = True,
) -> None:
    endpoint = sb.url.rstrip("/")
    run = ["run", "--endpoint", endpoint, "--rate", "5000", "-q"]
    goal_rss = "≤ 100 MB" if lines <= 1_000_000 else "≤ 200 MB"
    # The issue sets the time goal at 10^6 lines; at 10^7 only memory has one.
    goal_first = "≤ 5 s" if lines <= 1_000_000 else "none (≤ 5 s is the goal at 10^6)"

    work = folder / f"{label}-none"
    work.mkdir()
    manifest, ledger = generate(work, lines, 0, endpoint)
    got = child(["validate", str(manifest)], env=env)
    row(
        f"peak RSS, `validate`, {label} lines",
        f"{got.rss_mb:.0f} MB ({got.wall_s:.1f} s)",
        goal_rss,
    )
    got = child([*run, str(manifest), "--dry-run"], env=env)
    row(
        f"peak RSS, `run --dry-run`, {label} lines, empty ledger",
        f"{got.rss_mb:.0f} MB ({got.wall_s:.1f} s)",
        goal_rss,
    )
    manifest.unlink()
    ledger.unlink(missing_ok=True)

    work = folder / f"{label}-part"
    work.mkdir()
    done = lines * 3 // 10
    manifest, ledger = generate(work, lines, done, endpoint)
    got = child([*run, str(manifest)], env=env, sandbox=sb, stop_after_first_s=3)
    row(
        f"peak RSS, resuming {label} lines with {done} done in a ledger of an older "
        "worker (no index, no validation kept: both made now; SIGTERM 3 s after the "
        "first request)",
        f"{got.rss_mb:.0f} MB",
        goal_rss,
    )
    row(
        "time to the first request, that resume",
        _first(got),
        "≤ 8 s (issue 20)" if lines <= 1_000_000 else "none",
    )
    got = child([*run, str(manifest)], env=env, sandbox=sb, stop_after_first_s=1)
    row(
        "time to the first request, resuming after a run stopped by SIGTERM (its "
        "index and validated spool are current)",
        _first(got),
        goal_first,
    )
    got = child(
        [*run, str(manifest)],
        env=env,
        sandbox=sb,
        stop_after_first_s=1,
        stop_with=signal.SIGKILL,
    )
    got = child([*run, str(manifest)], env=env, sandbox=sb, stop_after_first_s=1)
    row(
        "peak RSS and time to the first request, resuming after a run killed with "
        "`kill -9` (it left its index as a checkpoint)",
        f"{got.rss_mb:.0f} MB, {_first(got)}",
        f"{goal_rss}, {goal_first}",
    )
    for p in work.iterdir():
        p.unlink()

    if not all_done:
        return
    work = folder / f"{label}-all"
    work.mkdir()
    manifest, ledger = generate(work, lines, lines, endpoint)
    got = child([*run, str(manifest)], env=env)
    row(
        f"peak RSS and time, rerun of {label} lines all done, in a ledger of an older "
        "worker (index and validation made now)",
        f"{got.rss_mb:.0f} MB, {got.wall_s:.1f} s (exit {got.code})",
        f"{goal_rss}, ≤ 12 s (issue 20)",
    )
    got = child([*run, str(manifest)], env=env)
    row(
        "peak RSS and time, rerunning it as a run left it (index and validation current)",
        f"{got.rss_mb:.0f} MB, {got.wall_s:.1f} s (exit {got.code})",
        f"{goal_rss}, ≤ 10 s",
    )
    got = child(["report", str(ledger), "--json"], env=env)
    row(
        "peak RSS and time, `report --json` on that ledger (counted against the manifest)",
        f"{got.rss_mb:.0f} MB, {got.wall_s:.1f} s (exit {got.code})",
        f"{goal_rss}, ≤ 10 s",
    )
    for p in work.iterdir():
        p.unlink()


def _first(got: Measured) -> str:
    return f"{got.first_request_s:.1f} s" if got.first_request_s is not None else "none"


def one_line(folder: Path, sb: SandboxProc, env: dict[str, str]) -> None:
    work = folder / "one"
    work.mkdir()
    manifest, _ = generate(work, 1, 0, sb.url.rstrip("/"))
    got = child(
        ["run", str(manifest), "--endpoint", sb.url.rstrip("/"), "--rate", "5000", "-q"], env=env
    )
    row(
        "a 1-line run at `--rate 5000` (process start to exit)",
        f"{got.wall_s:.2f} s (exit {got.code})",
        "≤ 0.4 s",
    )


SECTIONS = ("latency", "shared", "cpu", "memory", "listing", "rebuilds")
LIST_RATE = 5000  # the worker's --rate for the listing rows; the sandbox allows more
LIST_GOALS = {300_000: "≤ 100 MB", 1_000_000: "≤ 150 MB"}


def listing_rows(quick: bool) -> None:
    """Issue 18 item 4: `sync` with nothing to do over an account of N groups and an N-line
    manifest, and `export` of N groups; the worker's peak RSS (not the sandbox's) and wall
    time beside the listing's floor (N/1000 List requests at LIST_RATE)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOLC_", "WORKER_"))}
    env.update(VOLC_ACCESSKEY=AK, VOLC_SECRETKEY=SK)
    for groups in (30_000,) if quick else (300_000, 1_000_000):
        with tempfile.TemporaryDirectory(prefix="bench-listing-") as tmp:
            folder = Path(tmp)
            manifest, ledger = generate(folder, groups, 0, "unused")
            ledger.unlink()
            sb = big_sandbox(folder, manifest)
            try:
                listing_row(folder, manifest, groups, sb, env)
            finally:
                sb.stop()


def big_sandbox(folder: Path, preload: Path) -> SandboxProc:
    """A sandbox preloaded with `preload`: like start_sandbox, but given minutes to read
    10^6 groups (start_sandbox allows 20 s)."""
    log = folder / "arrivals.jsonl"
    cmd = [sys.executable, "-m", "worker", "sandbox", "--port", "0", "--log", str(log)]
    cmd += ["--keys", f"{AK}:{SK}", "--preload", str(preload), "--rate", "100000"]
    with (folder / "sandbox-stderr.txt").open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 600)
    first = proc.stdout.readline() if ready else ""
    if not first.startswith("sandbox listening on "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"sandbox did not start: {first!r}")
    return SandboxProc(proc=proc, url=first.split()[-1], log=log, keys={AK: SK})


def listing_row(
    folder: Path, manifest: Path, groups: int, sb: SandboxProc, env: dict[str, str]
) -> None:
    endpoint = ["--endpoint", sb.url.rstrip("/"), "--rate", str(LIST_RATE), "-q"]
    floor = f"floor {groups / 1000 / LIST_RATE:.1f} s ({groups // 1000} List at {LIST_RATE}/s)"
    goal = LIST_GOALS.get(groups, "flat")
    count = f"{groups:,}".replace(",", " ")
    got = child(["sync", str(manifest), *endpoint], env=env)
    row(
        f"`sync` with nothing to do: {count} listed groups, a {count}-line manifest "
        "(worker peak RSS, wall time)",
        f"{got.rss_mb:.0f} MB, {got.wall_s:.1f} s, {floor} (exit {got.code})",
        goal,
    )
    small = folder / "small.jsonl"  # a team's 100 groups in a busy account: the rest are kept
    with manifest.open("rb") as src:
        small.write_bytes(b"".join(line for _, line in zip(range(100), src, strict=False)))
    got = child(
        ["sync", str(small), "--ledger", str(folder / "small.ledger.jsonl"), *endpoint], env=env
    )
    row(
        f"`sync` of a 100-line manifest over {count} listed groups, the rest kept "
        "(worker peak RSS, wall time)",
        f"{got.rss_mb:.0f} MB, {got.wall_s:.1f} s, {floor} (exit {got.code})",
        goal,
    )
    out = folder / "export.jsonl"
    got = child(["export", "-o", str(out), *endpoint], env=env)
    exported = sum(1 for _ in out.open("rb")) if out.exists() else 0
    row(
        f"`export` of {count} groups (worker peak RSS, wall time)",
        f"{got.rss_mb:.0f} MB, {got.wall_s:.1f} s, {floor}; {exported} lines (exit {got.code})",
        goal,
    )


def rebuild_rows(quick: bool, baseline: Path | None) -> None:
    """Issue 20 item 4: the two runs at 10^6 lines that find nothing remembered (no index,
    no validated spool: after an upgrade, a moved ledger, a lost index), each on a fresh
    copy of the same files, by this tree and, with --baseline, by another worker tree
    (today's code) beside it. Load is the 1-minute load average when the row is measured."""
    lines = 100_000 if quick else 1_000_000
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOLC_", "WORKER_"))}
    env.update(VOLC_ACCESSKEY=AK, VOLC_SECRETKEY=SK)
    trees = [("this tree", env)]
    if baseline is not None:  # the child runs in a temporary folder: PYTHONPATH decides
        trees.append((f"{baseline}", {**env, "PYTHONPATH": str(baseline.resolve())}))
    with tempfile.TemporaryDirectory(prefix="bench-rebuilds-") as tmp:
        folder = Path(tmp)
        sb = start_sandbox(folder, keys={AK: SK})
        try:
            endpoint = sb.url.rstrip("/")
            run = ["run", "--endpoint", endpoint, "--rate", "5000", "-q"]
            for done, label, goal in (
                (lines * 3 // 10, "time to the first request, resuming", "≤ 8 s"),
                (lines, "time, rerun all done", "≤ 12 s"),
            ):
                source = folder / f"src-{done}"
                source.mkdir()
                manifest, ledger = generate(source, lines, done, endpoint)
                got = []
                for _, tree_env in trees:
                    work = folder / "work"
                    work.mkdir()
                    shutil.copyfile(ledger, work / ledger.name)
                    load = os.getloadavg()[0]
                    args = [*run, str(manifest), "--ledger", str(work / ledger.name)]
                    if done < lines:
                        m = child(args, env=tree_env, sandbox=sb, stop_after_first_s=0.5, cwd=work)
                        got.append(f"{_first(m)} (load {load:.1f})")
                    else:
                        m = child(args, env=tree_env, cwd=work)
                        got.append(f"{m.wall_s:.1f} s, {m.rss_mb:.0f} MB (load {load:.1f})")
                    shutil.rmtree(work)
                beside = "; ".join(f"{t}: {g}" for (t, _), g in zip(trees, got, strict=True))
                row(
                    f"{label} {lines} lines with {done} done, nothing remembered",
                    beside,
                    goal if lines == 1_000_000 else f"{goal} at 10^6",
                )
                shutil.rmtree(source)
        finally:
            sb.stop()


def latency_rows(quick: bool, runs: int) -> None:
    from bench import latency

    cases = latency.CASES
    if quick:  # the slow-server cases only, fewer groups
        cases = tuple(
            replace(c, groups=max(60, c.groups // 3)) for c in cases if c.latency_ms == "2000-4000"
        )
    for got in latency.measure(cases, runs=runs):
        case = got.case
        goal = (
            f"≥ {case.goal:.3g}, 0 throttles"
            if case.goal is not None
            else f"never above {case.concurrency} in flight, 0 throttles"
        )
        row(
            f"rate / limit, {case.label}",
            f"{got.rate_limit:.3f}, {got.throttles} throttles, at most {got.max_in_flight} in "
            f"flight (load {got.load:.1f})",
            goal,
        )


def shared_rows(quick: bool, runs: int) -> None:
    from bench import shared

    for got in shared.measure([3] if quick else [3, 6], runs=runs):
        lo, hi = got.shared_spread
        plo, phi = got.per_process_spread
        row(
            f"{got.processes} processes sharing one budget through Redis (limit 20/s, "
            f"latency 20-200 ms, {runs} run(s))",
            f"{got.shared_rate:.3f} ({lo:.3f}-{hi:.3f}), {got.shared_throttled} throttles; "
            f"private budgets instead: {got.per_process_rate:.3f} ({plo:.3f}-{phi:.3f}), "
            f"{got.per_process_throttled} throttles",
            "≥ 0.96, 0 throttles",
        )


def cpu_rows(quick: bool, runs: int) -> None:
    from bench import cpu

    for _ in range(runs):
        got = cpu.measure(requests=1000 if quick else 3000)
        row(
            f"client CPU per request at 5 000/s, {got.requests} requests (exit {got.exit_code})",
            f"{got.worker_ms:.3f} ms; the bare aiohttp + signer loop {got.floor_ms:.3f} ms: "
            f"{got.ratio:.2f} ×",
            "≤ 2 × the bare loop",
        )


def memory_rows(quick: bool, full: bool) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOLC_", "WORKER_"))}
    env.update(VOLC_ACCESSKEY=AK, VOLC_SECRETKEY=SK)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        folder = Path(tmp)
        sb = start_sandbox(folder, keys={AK: SK})
        try:
            one_line(folder, sb, env)
            if quick:
                scale(folder, 100_000, sb, env, "100 000")
            else:
                scale(folder, 1_000_000, sb, env, "1 000 000")
            if full:
                scale(folder, 10_000_000, sb, env, "10 000 000", all_done=False)
        finally:
            sb.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="10^5 lines, shorter cases")
    size.add_argument("--full", action="store_true", help="10^6 and 10^7 lines")
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections, comma-separated")
    parser.add_argument("--runs", type=int, default=1, help="runs of the noisy sections")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="rebuilds: another worker source tree (e.g. `git archive` of an older commit) "
        "measured beside this one",
    )
    opts = parser.parse_args()
    only = [s.strip() for s in opts.only.split(",") if s.strip()]
    if unknown := set(only) - set(SECTIONS):
        parser.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}")
    if opts.runs < 1:
        parser.error("--runs must be at least 1")
    print(f"python -m bench.scale {' '.join(sys.argv[1:])}".rstrip(), flush=True)
    print("| figure | this project | goal |\n| --- | --- | --- |", flush=True)
    for section in SECTIONS:
        if section not in only:
            continue
        if section == "latency":
            latency_rows(opts.quick, opts.runs)
        elif section == "shared":
            shared_rows(opts.quick, opts.runs)
        elif section == "cpu":
            cpu_rows(opts.quick, opts.runs)
        elif section == "memory":
            memory_rows(opts.quick, opts.full)
        elif section == "rebuilds":
            rebuild_rows(opts.quick, opts.baseline)
        else:
            listing_rows(opts.quick)


if __name__ == "__main__":
    main()
