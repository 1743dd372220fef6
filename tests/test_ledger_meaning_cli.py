"""One meaning of the ledger, through the real CLI against the sandbox: a word `sync`
wrote is read by `run` (and `report`, `sync`) as what it says about the account. The
full table of pairs is in test_plan.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AK, cli_env, run_worker, write_manifest
from tests.test_ledger import header, intent, line, result
from tests.test_report import groups_of
from worker.api import spec
from worker.ledger.records import Action, Outcome, Target

pytestmark = pytest.mark.slow  # real processes


def group(name: str, value: str = "v1") -> dict[str, Any]:
    return {
        "Name": name,
        "ProjectName": "default",
        "Tags": [{"Key": "k", "Value": value, "Category": "Custom"}],
    }


def available(groups: dict[str, dict[str, Any]]) -> set[str]:
    return {n for n, g in groups.items() if g["Status"] == 0}


def test_a_group_pruned_by_sync_and_put_back_is_created_again_by_run(
    tmp_path: Path, sandbox_factory: Any
) -> None:
    """run creates OldX; sync --prune deletes it; OldX is put back into the manifest and
    run on the same ledger sends it again (reason `deleted`), exit 0 with OldX in the
    account; a run after that skips it as done."""
    sb = sandbox_factory("--rate", "50")
    env = cli_env(tmp_path)
    ledger = tmp_path / "l.ledger.jsonl"
    both = write_manifest(tmp_path / "both.jsonl", [group("A1"), group("OldX")])
    kept = write_manifest(tmp_path / "kept.jsonl", [group("A1")])
    common = ("--endpoint", sb.url, "--ledger", str(ledger), "--rate", "50")
    first = run_worker("run", str(both), *common, env=env)
    assert first.returncode == 0, first.stderr
    pruned = run_worker("sync", str(kept), *common, "--prune", "--scope-match", "Old.*", env=env)
    assert pruned.returncode == 0, pruned.stderr
    assert available(sb.groups()) == {"A1"}
    again = run_worker("run", str(both), *common, env=env)
    assert again.returncode == 0, again.stderr
    assert available(sb.groups()) == {"A1", "OldX"}
    assert "deleted by an earlier sync" in again.stderr
    assert [c["name"] for c in sb.creates()] == ["A1", "OldX", "OldX"]
    last = run_worker("run", str(both), *common, env=env)
    assert last.returncode == 0 and "already created" in last.stderr, last.stderr
    assert len(sb.creates()) == 3  # nothing sent


def test_every_reader_takes_a_syncs_words_for_what_they_say(
    tmp_path: Path, sandbox_factory: Any
) -> None:
    """A ledger whose last sync recorded, per Name, updated / vanished / conflict / deleted /
    deferred / rejected, and a run's created: `run` sends exactly the Names the account does
    not hold as the line says (vanished, conflict, deleted, deferred), skips updated,
    created and the unchanged rejected; then `sync` leaves the account equal to the
    manifest whatever the words; `report` counts them as it does today."""
    rows = [group(n) for n in ("Upd", "Van", "Con", "Del", "Def", "Rej", "Cre")]
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    held = write_manifest(tmp_path / "held.jsonl", [group("Upd"), group("Cre"), group("Rej")])
    sb = sandbox_factory("--rate", "50", "--preload", str(held))
    fps = {n: g.fingerprint for n, g in groups_of(manifest).items()}
    target = Target(endpoint=sb.url, region=spec.DEFAULT_REGION, access_key=AK)

    def said(name: str, action: Action | None, outcome: Outcome, *, fp: bool = True) -> Any:
        got = result(name, outcome, fps[name] if fp else None)
        return dataclasses.replace(got, action=action)

    records = [
        header("r1", target=target, command="run"),
        intent("Cre", fps["Cre"]),
        result("Cre", Outcome.CREATED, fps["Cre"]),
        header("r2", target=target, command="sync"),
        said("Upd", Action.UPDATE, Outcome.UPDATED),
        said("Van", Action.UPDATE, Outcome.VANISHED),
        said("Con", None, Outcome.CONFLICT, fp=False),
        said("Del", Action.DELETE, Outcome.DELETED, fp=False),
        said("Def", Action.UPDATE, Outcome.DEFERRED),
        said("Rej", Action.CREATE, Outcome.REJECTED),
    ]
    ledger = tmp_path / "m.ledger.jsonl"
    ledger.write_bytes(b"".join(line(r) for r in records))
    env = cli_env(tmp_path)
    common = ("--endpoint", sb.url, "--ledger", str(ledger), "--rate", "50")
    report = run_worker("report", str(ledger), "--json", env=env)
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["total"] == 7
    ran = run_worker("run", str(manifest), *common, env=env)
    assert ran.returncode == 1, ran.stderr  # the unchanged rejected line still needs a fix
    assert '"reason":"rejected_unchanged","count":1' in ran.stderr
    assert sorted(c["name"] for c in sb.creates()) == ["Con", "Def", "Del", "Van"]
    assert available(sb.groups()) == {"Upd", "Cre", "Rej", "Con", "Def", "Del", "Van"}
    synced = run_worker("sync", str(manifest), *common, env=env)
    assert synced.returncode == 0, synced.stderr
    assert available(sb.groups()) == {r["Name"] for r in rows}
