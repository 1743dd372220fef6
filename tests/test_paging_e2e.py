"""List pages out together, end to end: the real CLI against a sandbox that answers slowly.

The sandbox's arrival log is the judge: which pages were asked for, how often, and what the
account holds afterwards. No timing is asserted (bench/sync.py measures the rate).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli_env, run_worker, write_manifest

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
