"""Saved plans, the question at a terminal and the readable plan, end to end: the real CLI
against the sandbox process. The sandbox's state and arrival log are the judge."""

from __future__ import annotations

import json
import os
import pty
import select
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SK, SandboxProc, cli_env, run_worker, worker_cmd, write_manifest

pytestmark = pytest.mark.slow

LIST, CREATE, UPDATE, DELETE = (
    "ListPullToPushGroup",
    "CreatePullToPushGroup",
    "UpdatePullToPushGroup",
    "DeletePullToPushGroup",
)
FAST = ("--rate", "50")
SCOPE = ("--prune", "--scope-match", "Extra.*|Sneaky.*")


def group(
    name: str, project: str = "default", tags: dict[str, str] | None = None
) -> dict[str, Any]:
    g: dict[str, Any] = {"Name": name, "ProjectName": project}
    if tags:
        g["Tags"] = [{"Key": k, "Value": v, "Category": "Custom"} for k, v in tags.items()]
    return g


ACCOUNT = [
    group("Same", tags={"a": "1"}),
    group("Retag", tags={"a": "1"}),
    group("Extra1"),
    group("Keep1", project="teamB"),
    group("Keep2", project="teamB"),
]
MANIFEST = [group("New"), group("Same", tags={"a": "1"}), group("Retag", tags={"b": "2"})]


def start(sandbox_factory: Any, tmp: Path, account: list[dict[str, Any]]) -> SandboxProc:
    preload = write_manifest(tmp / "preload.jsonl", account)
    sb: SandboxProc = sandbox_factory("--rate", "50", "--preload", str(preload))
    return sb


def worker(sb: SandboxProc, tmp: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return run_worker(*args, "--endpoint", sb.url, *FAST, env=cli_env(tmp), **kw)


def writes(arrivals: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(a["action"], a["name"]) for a in arrivals if a["action"] != LIST]


def make_plan(sb: SandboxProc, tmp: Path, *extra: str) -> tuple[Path, Path]:
    manifest = write_manifest(tmp / "m.jsonl", MANIFEST)
    plan = tmp / "plan.json"
    out = worker(sb, tmp, "sync", str(manifest), "--dry-run", "--plan-out", str(plan), *extra)
    assert out.returncode == 0, out.stderr
    return manifest, plan


def test_plan_out_then_plan_carries_out_exactly_the_saved_changes(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """--dry-run --plan-out writes a 0600 plan with every change and no secret, sending only
    List; --plan (no MANIFEST) then creates, updates and deletes exactly those, exit 0."""
    sb = start(sandbox_factory, tmp_path, ACCOUNT)
    _, plan = make_plan(sb, tmp_path, *SCOPE)
    assert stat.S_IMODE(plan.stat().st_mode) == 0o600
    assert {a["action"] for a in sb.arrivals()} == {LIST}
    text = plan.read_text(encoding="utf-8")
    assert SK not in text
    doc = json.loads(text)
    assert doc["format"] == "worker-sync-plan" and doc["version"] == 1
    changes = doc["changes"]
    assert [c["Name"] for c in changes["create"]] == ["New"]
    assert [c["Name"] for c in changes["update"]] == ["Retag"]
    assert changes["update"][0]["from"]["Tags"] == [
        {"Key": "a", "Value": "1", "Category": "Custom"}
    ]
    assert changes["delete"] == [{"Name": "Extra1", "from": {"ProjectName": "default", "Tags": []}}]
    assert changes["replace"] == []
    assert doc["options"]["prune"] is True and doc["counts"]["keep"] == 2
    before = len(sb.arrivals())
    out = worker(sb, tmp_path, "sync", "--plan", str(plan))
    assert out.returncode == 0, out.stderr
    assert sorted(writes(sb.arrivals()[before:])) == [
        (CREATE, "New"),
        (DELETE, "Extra1"),
        (UPDATE, "Retag"),
    ]
    groups = {n for n, g in sb.groups().items() if g["Status"] == 0}
    assert groups == {"New", "Same", "Retag", "Keep1", "Keep2"}


def test_a_new_extra_in_scope_makes_the_plan_stale(sandbox_factory: Any, tmp_path: Path) -> None:
    """A group created in the prune scope after the plan was made: --plan exits 2 naming
    it ("plan is stale: 1 new extra in scope: Sneaky1"), and sends no write."""
    sb = start(sandbox_factory, tmp_path, ACCOUNT)
    _, plan = make_plan(sb, tmp_path, *SCOPE)
    other = write_manifest(tmp_path / "other.jsonl", [group("Sneaky1")])
    assert worker(sb, tmp_path, "sync", str(other)).returncode == 0
    before = len(sb.arrivals())
    out = worker(sb, tmp_path, "sync", "--plan", str(plan))
    assert out.returncode == 2, out.stderr
    assert "plan is stale: 1 new extra in scope: Sneaky1" in out.stderr
    assert "make a new plan" in out.stderr and "Traceback" not in out.stderr
    assert writes(sb.arrivals()[before:]) == []
    assert not (tmp_path / "m.ledger.jsonl").exists() or not (
        tmp_path / "m.ledger.jsonl"
    ).read_text(encoding="utf-8")


def test_a_changed_account_state_of_a_planned_group_makes_the_plan_stale(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """The group a plan updates was retagged by someone else: stale, nothing written."""
    sb = start(sandbox_factory, tmp_path, ACCOUNT)
    _, plan = make_plan(sb, tmp_path, *SCOPE)
    other = write_manifest(tmp_path / "other.jsonl", [group("Retag", tags={"z": "9"})])
    assert worker(sb, tmp_path, "sync", str(other)).returncode == 0
    before = len(sb.arrivals())
    out = worker(sb, tmp_path, "sync", "--plan", str(plan))
    assert out.returncode == 2, out.stderr
    assert "1 group to update whose account state changed: Retag" in out.stderr
    assert writes(sb.arrivals()[before:]) == []


def test_a_changed_manifest_or_option_makes_the_plan_stale_before_any_request(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """A manifest whose sha256 changed, or --max-delete other than the plan's: exit 2
    naming it, and not even a List request goes out."""
    sb = start(sandbox_factory, tmp_path, ACCOUNT)
    manifest, plan = make_plan(sb, tmp_path, *SCOPE)
    before = len(sb.arrivals())
    option = worker(sb, tmp_path, "sync", "--plan", str(plan), "--max-delete", "7")
    assert option.returncode == 2, option.stderr
    assert "another option --max-delete: 7 (the plan's: 50)" in option.stderr
    write_manifest(manifest, [*MANIFEST, group("Late")])
    changed = worker(sb, tmp_path, "sync", "--plan", str(plan))
    assert changed.returncode == 2, changed.stderr
    assert "plan is stale: the manifest" in changed.stderr and "changed" in changed.stderr
    assert sb.arrivals()[before:] == []


def _tampered(plan: Path, how: str) -> None:
    doc = json.loads(plan.read_text(encoding="utf-8"))
    if how == "bad JSON":
        plan.write_text(plan.read_text(encoding="utf-8")[:-20], encoding="utf-8")
    elif how == "version":
        doc["version"] = 2
        plan.write_text(json.dumps(doc), encoding="utf-8")
    elif how == "field":
        del doc["changes"]["delete"][0]["from"]
        plan.write_text(json.dumps(doc), encoding="utf-8")
    elif how == "type":
        doc["options"]["max_delete"] = "50"
        plan.write_text(json.dumps(doc), encoding="utf-8")
    elif how == "huge":
        with plan.open("r+b") as f:
            f.truncate(65 << 20)  # sparse: the size alone refuses it


@pytest.mark.parametrize(
    ("how", "said"),
    [
        ("bad JSON", "not JSON"),
        ("version", "version: 2 is not a version this worker reads (1)"),
        ("field", "changes.delete[0].from: missing"),
        ("type", "options.max_delete: must be an integer"),
        ("huge", "larger than 64 MiB"),
    ],
)
def test_a_tampered_plan_file_is_refused_naming_the_file_and_field(
    sandbox_factory: Any, tmp_path: Path, how: str, said: str
) -> None:
    """Bad JSON, another version, a missing field, a wrong type, a huge file: exit 2 with
    the file and the field named, no traceback, no request at all."""
    sb = start(sandbox_factory, tmp_path, ACCOUNT)
    _, plan = make_plan(sb, tmp_path, *SCOPE)
    _tampered(plan, how)
    before = len(sb.arrivals())
    out = worker(sb, tmp_path, "sync", "--plan", str(plan))
    assert out.returncode == 2, out.stderr
    assert f"--plan {plan}: " in out.stderr and said in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert sb.arrivals()[before:] == []


def test_plan_out_and_plan_refuse_what_cannot_go_with_them(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """--plan-out without --dry-run, --plan with a MANIFEST, --plan-out onto the manifest:
    exit 2, each named."""
    sb = start(sandbox_factory, tmp_path, ACCOUNT)
    manifest, plan = make_plan(sb, tmp_path)
    no_dry = worker(sb, tmp_path, "sync", str(manifest), "--plan-out", str(tmp_path / "p2"))
    assert no_dry.returncode == 2 and "--plan-out" in no_dry.stderr and "--dry-run" in no_dry.stderr
    both = worker(sb, tmp_path, "sync", str(manifest), "--plan", str(plan))
    assert both.returncode == 2 and "give no MANIFEST" in both.stderr
    onto = worker(sb, tmp_path, "sync", str(manifest), "--dry-run", "--plan-out", str(manifest))
    assert onto.returncode == 2 and "one of the run's own files" in onto.stderr
    assert writes(sb.arrivals()) == []


# -- the question at a terminal -------------------------------------------------------------


def at_terminal(args: list[str], env: dict[str, str], answer: str | None) -> tuple[int, str]:
    """Run the worker with stdin, stdout and stderr on a pty; answer the question if asked."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(worker_cmd(*args), env=env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    out, answered = b"", False
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 120)
            assert ready, f"no output for 120 s: {out[-400:]!r}"
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every writer of the pty has closed it
                break
            if not chunk:
                break
            out += chunk
            if answer is not None and not answered and b"Type yes" in out:
                os.write(master, answer.encode() + b"\n")
                answered = True
    finally:
        os.close(master)
    return proc.wait(timeout=60), out.decode("utf-8", "replace")


@pytest.mark.parametrize(("answer", "code"), [("no", 2), ("yes", 0)])
def test_a_pruning_sync_at_a_terminal_asks_for_yes(
    sandbox_factory: Any, tmp_path: Path, answer: str, code: int
) -> None:
    """At a terminal a plan that deletes is shown with the question: `no` exits 2 with
    nothing written (not even a ledger record); `yes` carries it out."""
    sb = start(sandbox_factory, tmp_path, ACCOUNT)
    manifest = write_manifest(tmp_path / "m.jsonl", MANIFEST)
    args = ["sync", str(manifest), "--endpoint", sb.url, *FAST, *SCOPE]
    got, out = at_terminal(args, cli_env(tmp_path), answer)
    assert got == code, out
    assert "1 group will be deleted. Type yes" in out and "- Extra1" in out
    if answer == "no":
        assert "not confirmed" in out
        assert writes(sb.arrivals()) == []
        ledger = tmp_path / "m.ledger.jsonl"
        assert not ledger.exists() or ledger.read_text(encoding="utf-8") == ""
    else:
        assert (DELETE, "Extra1") in writes(sb.arrivals())


def test_yes_and_a_saved_plan_are_not_asked(sandbox_factory: Any, tmp_path: Path) -> None:
    """--yes answers the question; `sync --plan` does not ask (the plan was reviewed)."""
    sb = start(sandbox_factory, tmp_path, ACCOUNT)
    _, plan = make_plan(sb, tmp_path, *SCOPE)
    got, out = at_terminal(
        ["sync", "--plan", str(plan), "--endpoint", sb.url, *FAST], cli_env(tmp_path), None
    )
    assert got == 0 and "Type yes" not in out, out
    assert (DELETE, "Extra1") in writes(sb.arrivals())
    more = write_manifest(tmp_path / "n.jsonl", MANIFEST)
    args = ["sync", str(more), "--endpoint", sb.url, *FAST, *SCOPE, "--yes"]
    sb_writes = len(writes(sb.arrivals()))
    worker(sb, tmp_path, "sync", str(write_manifest(tmp_path / "x.jsonl", [group("Extra9")])))
    got, out = at_terminal(args, cli_env(tmp_path), None)
    assert got == 0 and "Type yes" not in out, out
    assert (DELETE, "Extra9") in writes(sb.arrivals())[sb_writes:]


def test_no_question_without_a_terminal_even_when_deleting(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """stdin a pipe (cron, CI): never a question, whatever comes down the pipe."""
    sb = start(sandbox_factory, tmp_path, ACCOUNT)
    manifest = write_manifest(tmp_path / "m.jsonl", MANIFEST)
    out = subprocess.run(
        worker_cmd("sync", str(manifest), "--endpoint", sb.url, *FAST, *SCOPE),
        env=cli_env(tmp_path),
        input="no\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "Type yes" not in out.stderr
    assert (DELETE, "Extra1") in writes(sb.arrivals())


# -- a plan a person can read ------------------------------------------------------------------


def test_kept_extras_are_counted_and_listed_only_with_v(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """Extras outside the scope are one counted `?` line; -v lists each; --json holds all."""
    sb = start(sandbox_factory, tmp_path, ACCOUNT)
    manifest = write_manifest(tmp_path / "m.jsonl", MANIFEST)
    text = worker(sb, tmp_path, "sync", str(manifest), "--dry-run", *SCOPE).stdout
    assert "? 2 extras not in the manifest; kept (outside the --prune scope)" in text
    assert "? Keep1" not in text and "- Extra1" in text
    verbose = worker(sb, tmp_path, "sync", str(manifest), "--dry-run", "-v", *SCOPE).stdout
    assert "? Keep1" in verbose and "? Keep2" in verbose
    as_json = json.loads(
        worker(sb, tmp_path, "sync", str(manifest), "--dry-run", "--json", *SCOPE).stdout
    )
    assert [k["Name"] for k in as_json["keep"]] == ["Keep1", "Keep2"]


def test_a_saved_plan_carries_out_its_replaces(sandbox_factory: Any, tmp_path: Path) -> None:
    """A plan made with --replace-conflicts records the replace with the state it was planned
    from; --plan then deletes the group in its old project and creates it in the manifest's,
    exit 0. The plan's options are the defaults: the flag need not be given again."""
    sb = start(sandbox_factory, tmp_path, [group("Moved", project="old")])
    manifest = write_manifest(tmp_path / "m.jsonl", [group("Moved", project="new")])
    plan = tmp_path / "plan.json"
    args = ("--scope-project", "old", "--replace-conflicts")
    out = worker(sb, tmp_path, "sync", str(manifest), "--dry-run", "--plan-out", str(plan), *args)
    assert out.returncode == 0, out.stderr
    assert "-/+ Moved" in out.stdout
    doc = json.loads(plan.read_text(encoding="utf-8"))
    assert doc["options"]["replace_conflicts"] is True
    assert doc["changes"]["replace"] == [
        {
            "Name": "Moved",
            "line": 1,
            "manifest_project": "new",
            "from": {"ProjectName": "old", "Tags": []},
        }
    ]
    before = len(sb.arrivals())
    out = worker(sb, tmp_path, "sync", "--plan", str(plan))
    assert out.returncode == 0, out.stderr
    assert writes(sb.arrivals()[before:]) == [(DELETE, "Moved"), (CREATE, "Moved")]
    assert sb.groups()["Moved"]["ProjectName"] == "new"
