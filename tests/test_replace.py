"""`worker sync --replace-conflicts` end to end: the real CLI against the sandbox process.

A group the account holds in another project is deleted and created again in the
manifest's project, only inside the scope, counted against --max-delete; the ledger holds
both halves, so a kill between them resumes to the create.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    SandboxProc,
    cli_env,
    ledger_records,
    run_worker,
    worker_cmd,
    write_manifest,
)
from tests.test_reconcile import account_of, group, listed
from worker.errors import PlanRefused
from worker.plan.reconcile import (
    Conflict,
    Replace,
    Scope,
    classify_group,
    in_sync,
    iter_changes,
    plan_sync,
)
from worker.plan.render import render_text

slow = pytest.mark.slow  # real processes: `pytest -m 'not slow'` skips them

LIST, CREATE, DELETE = "ListPullToPushGroup", "CreatePullToPushGroup", "DeletePullToPushGroup"
REPLACE = ("--scope-project", "old", "--replace-conflicts")


def made_in_old(sandbox_factory: Any, tmp: Path, *args: str) -> tuple[SandboxProc, Path]:
    """A sandbox where `worker run` created G1 in project "old" (created 1); and the manifest
    that now wants it in "new"."""
    sb: SandboxProc = sandbox_factory("--rate", "50", *args)
    old = write_manifest(tmp / "old.jsonl", [{"Name": "G1", "ProjectName": "old"}])
    made = run_worker("run", str(old), "--endpoint", sb.url, "--rate", "50", env=cli_env(tmp))
    assert made.returncode == 0, made.stderr
    new = write_manifest(tmp / "new.jsonl", [{"Name": "G1", "ProjectName": "new"}])
    return sb, new


def sync(
    sb: SandboxProc, manifest: Path, tmp: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    return run_worker(
        "sync", str(manifest), "--endpoint", sb.url, "--rate", "50", *args, env=cli_env(tmp)
    )


def writes(sb: SandboxProc) -> list[tuple[str, str]]:
    return [(a["action"], a["name"]) for a in sb.arrivals() if a["action"] != LIST]


@slow
def test_a_conflict_inside_the_scope_is_deleted_then_created_in_the_manifests_project(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """--scope-project old --replace-conflicts: exit 0, the group is in "new", created twice
    over its life (once by run, once by the replace), the delete sent before the create,
    and the ledger holds both halves in that order."""
    sb, new = made_in_old(sandbox_factory, tmp_path)
    before = len(writes(sb))
    out = sync(sb, new, tmp_path, *REPLACE)
    assert out.returncode == 0, out.stderr
    g1 = sb.groups()["G1"]
    assert g1["Status"] == 0 and g1["ProjectName"] == "new"
    assert g1["created"] == 2 and g1["deleted"] == 1
    assert writes(sb)[before:] == [(DELETE, "G1"), (CREATE, "G1")]
    halves = [
        (r["action"], r["outcome"])
        for r in ledger_records(tmp_path / "new.ledger.jsonl")
        if r["type"] == "result"
    ]
    assert halves == [("delete", "deleted"), ("create", "created")]
    again = sync(sb, new, tmp_path, *REPLACE)
    assert again.returncode == 0, again.stderr
    assert writes(sb)[before:] == [(DELETE, "G1"), (CREATE, "G1")]  # nothing more to do


@slow
def test_a_conflict_outside_the_scope_stays_a_conflict(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """The scope names another project: exit 1 (a conflict needs a human), nothing sent."""
    sb, new = made_in_old(sandbox_factory, tmp_path)
    before = len(writes(sb))
    out = sync(sb, new, tmp_path, "--scope-project", "elsewhere", "--replace-conflicts")
    assert out.returncode == 1, out.stderr
    assert "conflict" in out.stderr and "'old'" in out.stderr
    assert writes(sb)[before:] == []
    assert sb.groups()["G1"]["ProjectName"] == "old"


@slow
def test_replace_without_a_scope_is_refused_before_any_request(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """--replace-conflicts alone: exit 2 naming the flag and the scope flags, nothing sent."""
    sb, new = made_in_old(sandbox_factory, tmp_path)
    before = len(sb.arrivals())
    out = sync(sb, new, tmp_path, "--replace-conflicts")
    assert out.returncode == 2
    assert "--replace-conflicts" in out.stderr and "--scope-project" in out.stderr
    assert "Traceback" not in out.stderr
    assert len(sb.arrivals()) == before


@slow
def test_replaces_count_against_max_delete(sandbox_factory: Any, tmp_path: Path) -> None:
    """Two replaces and one extra in scope with --prune --max-delete 2: exit 2, the count and
    the flag named, only List requests; with --max-delete 3 all of it goes (exit 0)."""
    preload = write_manifest(
        tmp_path / "preload.jsonl",
        [{"Name": n, "ProjectName": "old"} for n in ("A1", "A2", "Extra")],
    )
    sb: SandboxProc = sandbox_factory("--rate", "50", "--preload", str(preload))
    new = write_manifest(
        tmp_path / "new.jsonl", [{"Name": n, "ProjectName": "new"} for n in ("A1", "A2")]
    )
    out = sync(sb, new, tmp_path, *REPLACE, "--prune", "--max-delete", "2")
    assert out.returncode == 2
    assert "3" in out.stderr and "--max-delete" in out.stderr and "replace" in out.stderr
    assert writes(sb) == []
    ok = sync(sb, new, tmp_path, *REPLACE, "--prune", "--max-delete", "3")
    assert ok.returncode == 0, ok.stderr
    groups = sb.groups()
    assert groups["Extra"]["Status"] == 1
    assert all(groups[n]["ProjectName"] == "new" and groups[n]["Status"] == 0 for n in ("A1", "A2"))


@slow
def test_dry_run_shows_the_replace(sandbox_factory: Any, tmp_path: Path) -> None:
    """--dry-run: `-/+ G1  project: old → new` in the text plan, a "replace" list in the
    JSON plan, and only List requests sent."""
    sb, new = made_in_old(sandbox_factory, tmp_path)
    before = len(writes(sb))
    text = sync(sb, new, tmp_path, *REPLACE, "--dry-run")
    assert text.returncode == 0, text.stderr
    assert "-/+ G1  project: old → new" in text.stdout.splitlines()
    assert "1 to replace" in text.stdout
    as_json = sync(sb, new, tmp_path, *REPLACE, "--dry-run", "--json")
    plan = json.loads(as_json.stdout)
    assert plan["replace"] == [{"Name": "G1", "manifest_project": "new", "account_project": "old"}]
    assert plan["counts"]["replace"] == 1 and plan["conflict"] == []
    assert writes(sb)[before:] == []


def kill_between_the_halves(sb: SandboxProc, new: Path, tmp: Path) -> Path:
    """Start a replacing sync whose ledger records are written slowly (in two halves, 1 s
    apart) and SIGKILL it once the delete's result is whole and the next record is torn:
    the delete is done, the create not recorded. Returns the ledger."""
    ledger = tmp / "new.ledger.jsonl"
    env = {**cli_env(tmp), "TESTHOOK_TORN_WRITES_S": "1.0"}
    args = ["sync", str(new), "--endpoint", sb.url, "--rate", "50", *REPLACE]
    proc = subprocess.Popen(
        worker_cmd(*args),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            data = ledger.read_bytes() if ledger.exists() else b""
            whole, _, torn = data.rpartition(b"\n")
            last = whole.rpartition(b"\n")[2]
            if torn and b'"type":"result"' in last and b'"action":"delete"' in last:
                break
            time.sleep(0.02)
        else:
            raise AssertionError("the delete half was never recorded")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return ledger


@slow
@pytest.mark.parametrize("resume", ["sync", "run"])
def test_kill_9_between_delete_and_create_resumes_to_the_create(
    resume: str, sandbox_factory: Any, tmp_path: Path
) -> None:
    """kill -9 after the delete half is recorded and before the create half: the group is
    absent, the ledger's word for it is "deleted"; then `sync` (it lists the group absent)
    or `run` on the same ledger ("deleted" → send) creates it in the manifest's project."""
    sb, new = made_in_old(sandbox_factory, tmp_path)
    ledger = kill_between_the_halves(sb, new, tmp_path)
    assert sb.groups()["G1"]["Status"] == 1  # deleted, not yet created again
    whole = ledger.read_bytes().rpartition(b"\n")[0].splitlines()  # the torn tail is cut
    words = [r for r in map(json.loads, whole) if r.get("name") == "G1"]
    assert (words[-1]["type"], words[-1]["outcome"]) == ("result", "deleted")
    if resume == "sync":
        out = sync(sb, new, tmp_path, *REPLACE)
    else:
        out = run_worker(
            "run", str(new), "--endpoint", sb.url, "--rate", "50", env=cli_env(tmp_path)
        )
    assert out.returncode == 0, out.stderr
    g1 = sb.groups()["G1"]
    assert g1["Status"] == 0 and g1["ProjectName"] == "new"
    assert g1["created"] == 2 and g1["deleted"] == 1


# -- the plan, pure ---------------------------------------------------------------------

OLD = Scope.from_flags(["old"], None)


def test_only_a_conflict_inside_the_scope_is_a_replace() -> None:
    """With `replacing`, a group in another project is a Replace when the scope holds it
    where it is now, else still a Conflict; without, always a Conflict."""
    g = group("G1", "new")
    assert isinstance(classify_group(g, account_of(listed("G1", "old"))), Conflict)
    inside = classify_group(g, account_of(listed("G1", "old")), replacing=OLD.contains)
    assert isinstance(inside, Replace) and inside.manifest_project == "new"
    outside = classify_group(g, account_of(listed("G1", "other")), replacing=OLD.contains)
    assert isinstance(outside, Conflict)


def test_a_replace_is_counted_as_a_delete_against_max_delete() -> None:
    """Two replaces and one extra: refused with --max-delete 2 (the message says how many
    are replaces), accepted with 3; no --prune needed for the replaces themselves."""
    items = [group("A1", "new"), group("A2", "new")]
    account = account_of(listed("A1", "old"), listed("A2", "old"), listed("X", "old"))
    with pytest.raises(PlanRefused, match=r"3 groups \(2 of them to replace\)"):
        plan_sync(items, account, prune=True, scope=OLD, max_delete=2, replace=True)
    plan = plan_sync(items, account, prune=True, scope=OLD, max_delete=3, replace=True)
    assert plan.removals == 3 and plan.counts["replace"] == 2 and plan.conflict == 0
    alone = plan_sync(items, account, scope=OLD, max_delete=2, replace=True)
    assert [r.name for r in alone.replaces] == ["A1", "A2"] and alone.deletes == ()
    assert not in_sync(alone, prune=False)  # a replace is drift for --check


def test_replace_without_a_scope_is_refused() -> None:
    """--replace-conflicts needs a scope, as --prune does: the message names the flag."""
    with pytest.raises(PlanRefused, match="--replace-conflicts needs a scope"):
        plan_sync([group("G1", "new")], account_of(listed("G1", "old")), replace=True)


def test_render_text_shows_a_replace_with_both_projects() -> None:
    """`-/+ Name  project: a → b`, and the count line says how many are replaced."""
    items = [group("G1", "new")]
    account = account_of(listed("G1", "old"))
    plan = plan_sync(items, account, scope=OLD, replace=True)
    lines = list(render_text(plan, iter_changes(plan, items, account)))
    assert lines[1:] == ["-/+ G1  project: old → new"]
    assert "1 in conflict" not in lines[0] and "1 to replace" in lines[0]
