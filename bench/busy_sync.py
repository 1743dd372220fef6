"""Benchmark (issue 16): one `sync` on a busy account, BEFORE and AFTER the rounds change.

    python -m bench.busy_sync --before-src /tmp/main-src     # main's worker package there
    python -m bench.busy_sync                                 # this tree only

The account: 20 000 groups of other teams, listed newest first, another party creating a
group every 2 s and deleting it 1 s later (`worker sandbox --list-order newest
--churn-every 2`), at the documented 10 requests/s. The manifest: 100 groups of our own, 50
already there and 50 missing. The sandbox is always this tree's (the old one cannot churn);
the worker child runs from `--before-src` (PYTHONPATH) for BEFORE. List requests and the
exit code come from the sandbox's arrival log and the child; wall time from the child's
start to its exit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.harness import start_sandbox
from worker.api import spec

AK, SK = "AKBENCHBUSY", "SKbenchbusysecret"


def _write(path: Path, groups: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(g, ensure_ascii=False) + "\n" for g in groups))
    return path


def measure(tmp: Path, label: str, src: Path | None, others: int, churn: float) -> str:
    preload = _write(
        tmp / "others.jsonl",
        [{"Name": f"Other{i:06d}", "ProjectName": "others"} for i in range(others)]
        + [{"Name": f"Mine{i:03d}", "ProjectName": "mine"} for i in range(50)],
    )
    manifest = _write(
        tmp / f"{label}.jsonl",
        [{"Name": f"Mine{i:03d}", "ProjectName": "mine"} for i in range(100)],
    )
    sb = start_sandbox(
        tmp,
        *("--rate", "10", "--preload", str(preload), "--list-order", "newest"),
        *("--churn-every", f"{churn:g}"),
        keys={AK: SK},
    )
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VOLC_", "WORKER_"))}
        env.update(HOME=str(tmp), VOLC_ACCESSKEY=AK, VOLC_SECRETKEY=SK)
        if src is not None:
            env["PYTHONPATH"] = str(src)
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "worker", "sync", str(manifest), "--endpoint", sb.url],
            env=env,
            cwd=tmp,  # not this tree: `-m` puts the working folder first on sys.path
            capture_output=True,
            text=True,
            timeout=900,
        )
        wall = time.monotonic() - started
        arrivals = [json.loads(x) for x in sb.log.read_text().splitlines() if x]
        actions = Counter(a["action"] for a in arrivals)
        mine = [g for g in sb.state()["groups"] if g["Name"].startswith("Mine")]
        there = sum(g["Status"] == 0 for g in mine)
    finally:
        sb.stop()
    tail = done.stderr.strip().splitlines()[-1][:160] if done.returncode else ""
    return (
        f"{label:7} exit {done.returncode}  List {actions[spec.LIST]:4}  "
        f"Create {actions[spec.CREATE]:3}  wall {wall:6.1f} s  manifest groups there "
        f"{there}/100" + (f"\n        last line: {tail}" if tail else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--before-src", type=Path, help="a folder holding main's worker/")
    parser.add_argument("--others", type=int, default=20_000)
    parser.add_argument("--churn-every", type=float, default=2.0)
    args = parser.parse_args()
    print(
        f"sync of 100 groups (50 missing) on {args.others} others, newest first, "
        f"churn every {args.churn_every:g} s, 10 req/s"
    )
    with tempfile.TemporaryDirectory(prefix="bench-busy-") as folder:
        tmp = Path(folder)
        if args.before_src is not None:
            (tmp / "before").mkdir()
            print(measure(tmp / "before", "BEFORE", args.before_src, args.others, args.churn_every))
        (tmp / "after").mkdir()
        print(measure(tmp / "after", "AFTER", None, args.others, args.churn_every))


if __name__ == "__main__":
    main()
