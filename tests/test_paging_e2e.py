"""List pages out together, end to end: the real CLI against a sandbox that answers slowly.

The sandbox's arrival log is the judge: which pages were asked for, how often, and what the
account holds afterwards. No timing is asserted (bench/sync.py measures the rate).
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli_env, run_worker, worker_cmd, write_manifest

pytestmark = pytest.mark.slow  # real processes: `pytest -m 'not slow'` skips them

LIST, CREATE, UPDATE = (
    "ListPullToPushGroup",
    "CreatePullToPushGroup",
    "UpdatePullToPushGroup",
)


def group(i: int, batch: str) -> dict[str, Any]:
    tags = [{"Key": "批次", "Value": batch, "Category": "Custom"}]
    return {"Name": f"组{i:06d}", "ProjectName": "default", "Tags": tags}


def test_a_slow_account_of_seven_pages_is_listed_each_page_once_per_listing(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """6 500 groups (7 pages of 1000) answered in 50-150 ms, the manifest 20 more and 30
    retagged: the first listing asks for pages 1-7 once each, the writes follow, the checking
    listing asks for pages 1-7 once each again; nothing is throttled, the account ends as
    the manifest says, exit 0."""
    account = [group(i, "old" if i < 30 else "b1") for i in range(6500)]
    manifest = [group(i, "b1") for i in range(6520)]
    preload = write_manifest(tmp_path / "preload.jsonl", account)
    sb = sandbox_factory("--rate", "50", "--preload", str(preload), "--latency-ms", "50-150")
    path = write_manifest(tmp_path / "m.jsonl", manifest)
    out = run_worker("sync", str(path), "--endpoint", sb.url, "--rate", "50", env=cli_env(tmp_path))
    assert out.returncode == 0, out.stderr
    lists = sb.of(LIST)
    assert Counter(a["page"] for a in lists) == Counter({n: 2 for n in range(1, 8)})
    first, second = lists[:7], lists[7:]
    assert first[0]["page"] == 1 and sorted(a["page"] for a in first) == list(range(1, 8))
    assert sorted(a["page"] for a in second) == list(range(1, 8))
    writes = sb.of(CREATE) + sb.of(UPDATE)
    assert max(a["t"] for a in first) <= min(a["t"] for a in writes)
    assert max(a["t"] for a in writes) <= min(a["t"] for a in second)
    assert sorted(a["name"] for a in sb.of(CREATE)) == [f"组{i:06d}" for i in range(6500, 6520)]
    assert sorted(a["name"] for a in sb.of(UPDATE)) == [f"组{i:06d}" for i in range(30)]
    assert not [a for a in sb.arrivals() if a["code"]]  # no FlowLimitExceeded, no error
    groups = sb.groups()
    assert len(groups) == 6520 and all(g["Status"] == 0 for g in groups.values())
    assert all(
        [(t["Key"], t["Value"]) for t in g["Tags"]] == [("批次", "b1")] for g in groups.values()
    )


def test_sigterm_while_pages_are_out_stops_the_sync_before_any_write(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """8 pages listed at --rate 2, SIGTERM once two have arrived: the pages still out or
    waiting for the budget are dropped, exit 4 (interrupted), no traceback, nothing written;
    the next sync lists every page once per listing and exits 0."""
    account = [group(i, "b1") for i in range(8000)]
    preload = write_manifest(tmp_path / "preload.jsonl", account)
    sb = sandbox_factory("--rate", "50", "--preload", str(preload), "--latency-ms", "100-200")
    path = write_manifest(tmp_path / "m.jsonl", [*account, group(8000, "b1")])
    err = tmp_path / "stderr.txt"
    with err.open("wb") as f:
        proc = subprocess.Popen(
            worker_cmd("sync", str(path), "--endpoint", sb.url, "--rate", "2"),
            env=cli_env(tmp_path),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=f,
        )
    try:
        deadline = time.monotonic() + 60
        while len(sb.of(LIST)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = err.read_text()
    assert code == 4, text[-3000:]
    assert "Traceback" not in text and "run.stopping" in text
    assert not sb.of(CREATE) and not sb.of(UPDATE)
    before = len(sb.of(LIST))
    out = run_worker("sync", str(path), "--endpoint", sb.url, "--rate", "50", env=cli_env(tmp_path))
    assert out.returncode == 0, out.stderr
    again = sb.of(LIST)[before:]
    # Pages 1-8 before the create, pages 1-9 after it (8 001 groups).
    assert Counter(a["page"] for a in again) == Counter([*range(1, 9), *range(1, 10)])
    assert [a["name"] for a in sb.of(CREATE)] == ["组008000"]
