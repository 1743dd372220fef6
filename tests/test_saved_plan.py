"""plan/saved.py: the plan file written and read back, its schema, and what makes it stale."""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from worker.api.account import Listed
from worker.errors import UsageError
from worker.ledger.records import Target
from worker.plan import saved

STATE = Listed(name="X1", project="p", tags=(("b", "2", "Custom"), ("a", "1", "Custom")))


def a_plan(**changes: dict[str, dict[str, Any]]) -> saved.Saved:
    every: saved.Changes = {kind: {} for kind in saved.KINDS}
    every.update(changes)
    return saved.Saved(
        created="2024-01-01T00:00:00.000Z",
        target=Target(
            endpoint="https://open.volcengineapi.com", region="cn-north-1", access_key="AK"
        ),
        manifest_path="/srv/m.jsonl",
        manifest_sha256="0" * 64,
        options=saved.PlanOptions(
            prune=True, scope_projects=("p",), scope_match=None, max_delete=50
        ),
        counts={
            "create": 0,
            "update": 0,
            "conflict": 0,
            "delete": 1,
            "replace": 0,
            "keep": 0,
            "in_sync": 0,
        },
        changes=every,
    )


DELETE_X1: dict[str, dict[str, Any]] = {"X1": {"Name": "X1", "from": saved._state(STATE)}}


def test_a_written_plan_reads_back_equal_and_is_private(tmp_path: Path) -> None:
    """write then read gives the same plan; the file is mode 0600 with sorted tags."""
    plan = a_plan(delete=DELETE_X1)
    path = tmp_path / "plan.json"
    saved.write(path, plan)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert saved.read(path) == plan
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert [t["Key"] for t in doc["changes"]["delete"][0]["from"]["Tags"]] == ["a", "b"]
    assert list(saved.differences(plan, saved.read(path))) == []


def test_differences_name_target_options_manifest_then_changes() -> None:
    """Each kind of difference is said, most telling first."""
    old = a_plan(delete=DELETE_X1)
    moved = {"X1": {"Name": "X1", "from": {"ProjectName": "p", "Tags": []}}}
    new = dataclasses.replace(
        old,
        target=dataclasses.replace(old.target, region="cn-beijing"),
        options=dataclasses.replace(old.options, max_delete=3),
        manifest_sha256="1" * 64,
        changes={**old.changes, "delete": {**moved, "S1": {"Name": "S1", "from": None}}},
    )
    said = list(saved.differences(old, new))
    assert said[0].startswith("another target:")
    assert said[1] == "another option --max-delete: 3 (the plan's: 50)"
    assert said[2].startswith("the manifest /srv/m.jsonl changed")
    assert said[3:] == [
        "1 new extra in scope: S1",
        "1 extra in scope whose account state changed: X1",
    ]


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (lambda d: d.pop("created"), "created: missing"),
        (lambda d: d.update(extra=1), "extra: not a field of a plan"),
        (lambda d: d["options"].update(prune="yes"), "options.prune: must be true or false"),
        (lambda d: d["manifest"].update(sha256="xyz"), "manifest.sha256: not a sha256"),
        (
            lambda d: d["changes"]["replace"].append({"Name": "X"}),
            "changes.replace[0].line: missing",
        ),
        (
            lambda d: d["changes"]["delete"].append(d["changes"]["delete"][0]),
            "changes.delete[1].Name: given twice",
        ),
        (lambda d: d.update(format="other"), "format: not a worker sync plan"),
    ],
)
def test_a_bad_plan_file_is_refused_naming_the_field(
    tmp_path: Path, edit: object, said: str
) -> None:
    """Strict schema: a missing, unknown, mistyped or repeated field names itself."""
    path = tmp_path / "plan.json"
    saved.write(path, a_plan(delete=DELETE_X1))
    doc = json.loads(path.read_text(encoding="utf-8"))
    edit(doc)  # type: ignore[operator]
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(UsageError) as got:
        saved.read(path)
    assert f"--plan {path}: {said}" in str(got.value)
