"""report: counts per line of the last run's manifest, how each run ended, and --failed."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import orjson

from tests.conftest import names, write_manifest
from tests.test_ledger import footer, header, intent, line, result
from worker.commands import report
from worker.ledger.records import Action, Outcome, Record, Result, StopReason
from worker.ledger.state import State
from worker.manifest import source, spool
from worker.manifest.values import Group
from worker.report import render, status, sync_audit


def groups_of(path: Path) -> dict[str, Group]:
    with source.scan(path) as scan:
        return {g.name: g for g in spool.read(scan) if isinstance(g, Group)}


def ledger_for(
    tmp_path: Path,
    manifest_path: Path,
    *records: Record,
    before: tuple[Record, ...] = (),
    **over: Any,
) -> Path:
    """A ledger whose last run (header `over`, e.g. command="sync") used `manifest_path` as
    it is now, then `records`; `before` are the records of earlier runs."""
    sha = hashlib.sha256(manifest_path.read_bytes()).hexdigest()
    path = tmp_path / "m.ledger.jsonl"
    last = header(**{"manifest": str(manifest_path), "manifest_sha256": sha, **over})
    path.write_bytes(b"".join(line(r) for r in (*before, last, *records)))
    return path


def deleted(name: str, run_id: str = "r1") -> Result:
    """A prune's delete of `name` (no manifest line) answered OK."""
    return dataclasses.replace(
        result(name, Outcome.DELETED, None, 0), action=Action.DELETE, run_id=run_id
    )


def in_run(run_id: str, records: list[Record]) -> list[Record]:
    """`records` as written by run `run_id` (the helpers write r1)."""
    return [dataclasses.replace(r, run_id=run_id) for r in records]


def done(g: Group, outcome: Outcome = Outcome.CREATED, code: str = "") -> list[Record]:
    return [
        intent(g.name, g.fingerprint, g.line),
        result(g.name, outcome, g.fingerprint, g.line, code=code),
    ]


def run_main(ledger: Path, **kwargs: Any) -> tuple[bytes, str]:
    out, err = io.StringIO(), io.StringIO()
    assert report.main(ledger, out=out, err=err, **kwargs) == 0
    return out.getvalue().encode(), err.getvalue()


def summary(ledger: Path, **kwargs: Any) -> dict[str, Any]:
    out, _ = run_main(ledger, json=True, **kwargs)
    loaded: dict[str, Any] = json.loads(out)
    return loaded


def test_names_no_longer_in_the_manifest_are_not_counted(tmp_path: Path) -> None:
    """13 Names created by earlier manifests, 10 lines now, 7 of them done: created 7 of 10,
    pending 3 (never "created 13 of total 10")."""
    old = write_manifest(tmp_path / "old.jsonl", names(13, "旧"))
    now = write_manifest(tmp_path / "m.jsonl", names(10))
    records = [r for g in groups_of(old).values() for r in done(g)]
    records += [r for g in list(groups_of(now).values())[:7] for r in done(g)]
    got = summary(ledger_for(tmp_path, now, *records))
    assert (got["scope"], got["total"], got["created"], got["pending"]) == ("manifest", 10, 7, 3)
    assert got["done"] == 7 and got["not_done"] == 3
    assert got["actions"] == {"create/created": 7}


def test_a_duplicate_names_invalid_line_is_counted_by_line(tmp_path: Path) -> None:
    """Invalid lines (duplicates of valid Names among them) are counted per line, whatever
    the valid line's result says: invalid 3 after a run that recorded 3 invalid lines."""
    rows: list[dict[str, Any]] = names(4)
    rows += [rows[0], rows[1], {"Name": "bad name!"}]
    path = write_manifest(tmp_path / "m.jsonl", rows)
    valid = groups_of(path)
    records: list[Record] = [
        result(rows[0]["Name"], Outcome.INVALID, None, 5),
        result(rows[1]["Name"], Outcome.INVALID, None, 6),
        result(None, Outcome.INVALID, None, 7),
    ]
    records += [r for g in valid.values() for r in done(g)]
    got = summary(ledger_for(tmp_path, path, *records))
    assert (got["total"], got["created"], got["invalid"], got["pending"]) == (7, 4, 3, 0)
    assert got["codes"] == {"InvalidManifestLine": 3}


def test_no_phantom_zero_rows(tmp_path: Path) -> None:
    """Codes that did not occur are not listed (no `InvalidManifestLine 0`)."""
    path = write_manifest(tmp_path / "m.jsonl", names(2))
    records = [r for g in groups_of(path).values() for r in done(g)]
    ledger = ledger_for(tmp_path, path, *records)
    assert summary(ledger)["codes"] == {}
    text, _ = run_main(ledger)
    assert b"InvalidManifestLine" not in text


def test_each_line_gets_its_status(tmp_path: Path) -> None:
    """Done, rejected, deferred, in doubt, never sent, and a rejected line changed since
    (pending: the next run sends it) are told apart."""
    path = write_manifest(tmp_path / "m.jsonl", names(6))
    g = list(groups_of(path).values())
    changed = result(g[5].name, Outcome.REJECTED, "9" * 64, g[5].line, code="InvalidParam")
    records = [
        *done(g[0]),
        *done(g[1], Outcome.REJECTED, "InvalidParam"),
        *done(g[2], Outcome.DEFERRED, "InternalError"),
        intent(g[3].name, g[3].fingerprint, g[3].line),
        changed,
    ]
    got = summary(ledger_for(tmp_path, path, *records))
    assert {k: got[k] for k in ("created", "rejected", "deferred", "in_doubt", "pending")} == {
        "created": 1,
        "rejected": 1,
        "deferred": 1,
        "in_doubt": 1,
        "pending": 2,
    }
    assert got["codes"] == {"InternalError": 1, "InvalidParam": 1}


def test_a_changed_manifest_falls_back_to_every_name_recorded(tmp_path: Path) -> None:
    """When the last run's manifest has changed, the report says its counts cover every
    Name recorded and does not claim a pending count; --manifest counts against a file."""
    path = write_manifest(tmp_path / "m.jsonl", names(3))
    records = [r for g in groups_of(path).values() for r in done(g)]
    ledger = ledger_for(tmp_path, path, *records)
    write_manifest(path, names(5))
    got = summary(ledger)
    assert got["scope"] == "ledger" and got["pending"] is None and got["created"] == 3
    assert "has changed since" in got["note"] and "every Name" in got["note"]
    forced = summary(ledger, manifest=path)
    assert (forced["scope"], forced["created"], forced["pending"]) == ("manifest", 3, 2)
    assert "not the manifest the last run used" in forced["note"]


def test_how_each_run_ended(tmp_path: Path) -> None:
    """finished, interrupted, stopped (with the reason), crashed, and the last run running
    while its lock is held, from the footers and the lock probe."""
    runs: list[Record] = [
        header("r1"),
        footer("r1"),
        header("r2"),
        footer("r2", StopReason.SIGNAL),
        header("r3"),
        footer("r3", StopReason.ABORTED),
        header("r4"),
        header("r5"),
    ]
    state = State()
    for record in runs:
        state.fold(record)
    got = status.summary_of(state, items=None, locked=True)
    assert [r["state"] for r in got["runs"]] == [
        "finished",
        "interrupted",
        "stopped",
        "crashed",
        "running",
    ]
    assert got["runs"][2]["stopped_by"] == "aborted"
    assert "refused the run" in got["runs"][2]["ended"]
    assert status.summary_of(state, items=None, locked=False)["last_run"]["state"] == "crashed"


def test_each_run_shows_its_pacing(tmp_path: Path) -> None:
    """Duration, achieved rate against --rate and throttles come from the footer, in JSON
    and in text."""
    path = write_manifest(tmp_path / "m.jsonl", names(1))
    end = footer()
    paced = type(end)(
        **{
            **{f: getattr(end, f) for f in end.__dataclass_fields__},
            "duration_s": 12.5,
            "rate_achieved": 9.7,
            "throttles": 2,
        }
    )
    ledger = ledger_for(tmp_path, path, *done(next(iter(groups_of(path).values()))), paced)
    run = summary(ledger)["last_run"]
    assert (run["duration_s"], run["rate_limit"], run["rate_achieved"], run["throttles"]) == (
        12.5,
        10.0,
        9.7,
        2,
    )
    text, _ = run_main(ledger)
    assert "12.5 s" in text.decode() and "9.70/s of 10/s (97%)" in text.decode()
    assert "2 throttled" in text.decode()


def test_failed_lists_every_line_not_done_as_a_manifest(tmp_path: Path) -> None:
    """--failed prints every line not done, never-sent ones included, as a valid manifest
    on stdout in line order; each reason goes to stderr; invalid lines are named there."""
    rows = names(5)
    rows.append({"Name": "bad name!"})
    path = write_manifest(tmp_path / "m.jsonl", rows)
    g = list(groups_of(path).values())
    records = [
        *done(g[0]),
        *done(g[1], Outcome.REJECTED, "InvalidParam"),
        intent(g[2].name, g[2].fingerprint, g[2].line),
    ]  # 3, 4: never sent
    ledger = ledger_for(tmp_path, path, *records)
    out, err = run_main(ledger, failed=True)
    listed = [json.loads(x) for x in out.splitlines()]
    assert [x["Name"] for x in listed] == [x.name for x in g[1:]]
    again = write_manifest(tmp_path / "again.jsonl", listed)
    with source.scan(again) as scan:
        assert scan.problem_count == 0
    assert f"{path}:2: {g[1].name}: rejected (InvalidParam)" in err
    assert f"{path}:3: {g[2].name}: in doubt" in err
    assert f"{path}:4: {g[3].name}: pending: never sent" in err
    assert f"{path}:6: bad name!: invalid: Name:" in err


def test_failed_json_gives_line_name_reason_body(tmp_path: Path) -> None:
    """--failed --json prints one JSON object per line not done: line, name, reason, body."""
    path = write_manifest(tmp_path / "m.jsonl", names(2))
    g = list(groups_of(path).values())
    out, _ = run_main(ledger_for(tmp_path, path, *done(g[0])), failed=True, json=True)
    (only,) = [json.loads(x) for x in out.splitlines()]
    assert only == {
        "line": 2,
        "name": g[1].name,
        "status": "pending",
        "reason": "pending: never sent",
        "body": orjson.loads(g[1].body),
    }


def test_failed_without_the_manifest_uses_the_recorded_bodies(tmp_path: Path) -> None:
    """When the manifest is gone, --failed lists what the ledger recorded (bodies from a
    second pass) and says that never-sent lines cannot be listed."""
    path = write_manifest(tmp_path / "m.jsonl", names(3))
    g = list(groups_of(path).values())
    rejected = result(g[1].name, Outcome.REJECTED, g[1].fingerprint, g[1].line, code="X")
    rejected = type(rejected)(
        **{
            **{f: getattr(rejected, f) for f in rejected.__dataclass_fields__},
            "body": orjson.loads(g[1].body),
        }
    )
    ledger = ledger_for(tmp_path, path, *done(g[0]), rejected)
    path.unlink()
    out, err = run_main(ledger, failed=True)
    assert out == g[1].body + b"\n"
    assert "lines never sent cannot be listed" in err


def test_a_finished_sync_counts_unrecorded_lines_in_sync(tmp_path: Path) -> None:
    """A sync that went through every line and recorded none (all in sync): every line is
    `in_sync` and done, none pending; text says so; --failed lists nothing."""
    path = write_manifest(tmp_path / "m.jsonl", names(12))
    ledger = ledger_for(tmp_path, path, footer("r1"), command="sync")
    got = summary(ledger)
    assert (got["total"], got["in_sync"], got["pending"]) == (12, 12, 0)
    assert (got["done"], got["not_done"]) == (12, 0)
    text, _ = run_main(ledger)
    rows = [x.split() for x in text.decode().splitlines()]
    assert ["in", "sync", "12"] in rows and ["pending", "0"] in rows
    assert "found in sync with the account by the last sync" in text.decode()
    out, err = run_main(ledger, failed=True)
    assert out == b"" and "0 line(s) not done" in err
    json_out, _ = run_main(ledger, failed=True, json=True)
    assert json_out == b""


def test_a_sync_that_did_not_finish_leaves_unrecorded_lines_pending(tmp_path: Path) -> None:
    """After a sync stopped by a signal, stopped by the server, or with no footer (crashed),
    lines it recorded nothing for may not have been reached: pending, never in_sync."""
    path = write_manifest(tmp_path / "m.jsonl", names(3))
    g = list(groups_of(path).values())
    for end in (
        [footer("r1", StopReason.SIGNAL)],
        [footer("r1", StopReason.UNREACHABLE)],
        [],
    ):
        ledger = ledger_for(tmp_path, path, *done(g[0]), *end, command="sync")
        got = summary(ledger)
        assert (got["created"], got["in_sync"], got["pending"]) == (1, 0, 2)
        out, _ = run_main(ledger, failed=True)
        assert [json.loads(x)["Name"] for x in out.splitlines()] == [g[1].name, g[2].name]


def test_a_run_ledger_without_records_stays_pending(tmp_path: Path) -> None:
    """A finished `run` that recorded nothing for lines is not a sync: they stay pending,
    and `actions` still counts per line."""
    path = write_manifest(tmp_path / "m.jsonl", names(3))
    g = list(groups_of(path).values())
    got = summary(ledger_for(tmp_path, path, *done(g[0]), footer("r1")))
    assert (got["created"], got["in_sync"], got["pending"]) == (1, 0, 2)
    assert got["actions"] == {"create/created": 1} and got["actions_over"] == "lines"
    assert "deletes" not in got


def test_a_finished_sync_outranks_an_earlier_runs_word_on_lines_it_did_not_record(
    tmp_path: Path,
) -> None:
    """After a finished sync that exited 3: a line it created is `created`; a line it
    deferred is deferred; a line it recorded nothing for is `in_sync`, even when an earlier
    run left it created, rejected or in doubt (the sync listed the account after that)."""
    path = write_manifest(tmp_path / "m.jsonl", names(6))
    g = list(groups_of(path).values())
    earlier = [
        header("r0", manifest=str(path)),
        *in_run("r0", done(g[1])),
        *in_run("r0", done(g[2], Outcome.REJECTED, "InvalidParam")),
        *in_run("r0", [intent(g[5].name, g[5].fingerprint, g[5].line)]),
        footer("r0"),
    ]
    ledger = ledger_for(
        tmp_path,
        path,
        *done(g[0]),
        *done(g[3], Outcome.DEFERRED, "InternalError"),
        dataclasses.replace(footer("r1"), exit_code=3),
        before=tuple(earlier),
        command="sync",
    )
    got = summary(ledger)
    assert {
        k: got[k] for k in ("created", "in_sync", "rejected", "deferred", "pending", "in_doubt")
    } == {
        "created": 1,
        "in_sync": 4,  # g[1], g[2], g[5] (earlier words) and g[4] (never recorded)
        "rejected": 0,
        "deferred": 1,
        "pending": 0,
        "in_doubt": 0,
    }
    assert (got["done"], got["not_done"]) == (5, 1)
    out, _ = run_main(ledger, failed=True)
    assert [json.loads(x)["Name"] for x in out.splitlines()] == [g[3].name]


def test_a_sync_that_exited_0_leaves_no_line_in_doubt_or_pending(tmp_path: Path) -> None:
    """A finished sync that exited 0 checked the account against every line: a line whose
    word in that sync is deferred or in doubt (a later round found it in sync) is in_sync;
    a line it created stays created."""
    path = write_manifest(tmp_path / "m.jsonl", names(3))
    g = list(groups_of(path).values())
    ledger = ledger_for(
        tmp_path,
        path,
        *done(g[0]),
        *done(g[1], Outcome.DEFERRED, "InternalError"),
        intent(g[2].name, g[2].fingerprint, g[2].line),
        footer("r1"),
        command="sync",
    )
    got = summary(ledger)
    assert (got["created"], got["in_sync"], got["deferred"], got["in_doubt"]) == (1, 2, 0, 0)
    assert (got["pending"], got["not_done"]) == (0, 0)
    assert "in doubt" not in run_main(ledger)[0].decode()
    out, err = run_main(ledger, failed=True)
    assert out == b"" and "0 line(s) not done" in err


def test_the_last_syncs_verdict_needs_the_manifest_it_used(tmp_path: Path) -> None:
    """Counted against another manifest (--manifest), lines the last sync recorded nothing
    for are not `in_sync`: that sync never saw them."""
    used = write_manifest(tmp_path / "m.jsonl", names(2))
    ledger = ledger_for(tmp_path, used, footer("r1"), command="sync")
    other = write_manifest(tmp_path / "other.jsonl", names(3, prefix="乙"))
    got = summary(ledger, manifest=other)
    assert (got["in_sync"], got["pending"]) == (0, 3)
    assert summary(ledger)["in_sync"] == 2


def test_a_conflict_is_a_conflict_naming_both_projects(tmp_path: Path) -> None:
    """A conflict (nothing sent, with or without the line's fingerprint) is counted and
    listed as a conflict with the sync's message, never as a changed line; once the line
    really changed, it is pending."""
    path = write_manifest(tmp_path / "m.jsonl", names(2))
    g = list(groups_of(path).values())
    said = "the account's group is in project 'other', the manifest says 'default'"
    for fp in (g[1].fingerprint, None):
        clash = dataclasses.replace(
            result(g[1].name, Outcome.CONFLICT, fp, g[1].line, code="ProjectConflict"),
            action=None,
            message=said,
        )
        end = dataclasses.replace(footer("r1"), exit_code=1)
        ledger = ledger_for(tmp_path, path, *done(g[0]), clash, end, command="sync")
        got = summary(ledger)
        assert (got["conflict"], got["pending"], got["created"]) == (1, 0, 1)
        assert got["conflicts"] == [
            {"line": g[1].line, "name": g[1].name, "reason": f"conflict (ProjectConflict): {said}"}
        ]
        text = run_main(ledger)[0].decode()
        assert f"line {g[1].line}: {g[1].name}: conflict (ProjectConflict): {said}" in text
        _, err = run_main(ledger, failed=True)
        assert said in err and "changed since" not in err
    clash = dataclasses.replace(
        result(g[1].name, Outcome.CONFLICT, "0" * 64, g[1].line), action=None
    )
    ledger = ledger_for(tmp_path, path, *done(g[0]), clash, footer("r1"), command="sync")
    assert (summary(ledger)["conflict"], summary(ledger)["pending"]) == (0, 1)


def test_a_delete_of_an_absent_group_is_already_gone(tmp_path: Path) -> None:
    """A delete answered ResourceNotFound is `already gone`, in the actions, the deletes and
    (without a manifest) the statuses, never counted as a delete."""
    path = write_manifest(tmp_path / "m.jsonl", names(1))
    gone = dataclasses.replace(
        deleted("Lagging"), status=404, code="ResourceNotFound", message="not found"
    )
    ledger = ledger_for(tmp_path, path, deleted("Real"), gone, footer("r1"), command="sync")
    got = summary(ledger)
    assert got["actions"] == {"delete/already_gone": 1, "delete/deleted": 1}
    assert got["deletes"] == {"total": 1, "names": ["Real"]}
    assert got["already_gone_deletes"] == {"total": 1, "names": ["Lagging"]}
    text = run_main(ledger)[0].decode()
    assert "deleted (1): Real" in text
    assert "already gone (delete answered ResourceNotFound) (1): Lagging" in text
    path.write_text("")  # the manifest changed: counted per Name recorded
    by_name = summary(ledger)
    assert (by_name["deleted"], by_name["already_gone"], by_name["scope"]) == (1, 1, "ledger")


def test_a_manifest_line_whose_group_was_deleted_is_pending(tmp_path: Path) -> None:
    """A Name deleted by a prune and given again by the manifest is not done: pending."""
    path = write_manifest(tmp_path / "m.jsonl", names(1))
    g = list(groups_of(path).values())
    ledger = ledger_for(tmp_path, path, deleted(g[0].name), footer("r1"))
    got = summary(ledger)
    assert (got["pending"], got["deleted"], got["done"]) == (1, 0, 0)
    _, err = run_main(ledger, failed=True)
    assert "deleted since" in err


def test_a_prunes_deletes_are_counted_and_named(tmp_path: Path) -> None:
    """Deletes are no manifest line: on a sync ledger `actions` counts every result of every
    run (delete/deleted 4 among them), the text shows them by action, and `deletes` names
    the deleted groups."""
    path = write_manifest(tmp_path / "m.jsonl", names(2))
    g = list(groups_of(path).values())
    gone = [f"旧{i}" for i in range(4)]
    ledger = ledger_for(
        tmp_path,
        path,
        *done(g[0]),
        *(deleted(n) for n in gone),
        footer("r1"),
        command="sync",
    )
    got = summary(ledger)
    assert got["actions"] == {"create/created": 1, "delete/deleted": 4}
    assert got["actions_over"] == "results"
    assert got["deletes"] == {"total": 4, "names": gone}
    assert (got["created"], got["in_sync"], got["deleted"], got["total"]) == (1, 1, 0, 2)
    text = run_main(ledger)[0].decode()
    assert "by action (every result of every run):" in text
    assert ["delete/deleted", "4"] in [x.split() for x in text.splitlines()]
    assert f"deleted (4): {', '.join(gone)}" in text


def test_deleted_names_are_bounded(tmp_path: Path) -> None:
    """More deletes than DELETED_LISTED: --json lists the first 1000 and counts them all;
    the text shows a few and says how many more."""
    path = write_manifest(tmp_path / "m.jsonl", names(1))
    gone = [f"x{i:05d}" for i in range(sync_audit.DELETED_LISTED + 5)]
    ledger = ledger_for(tmp_path, path, *(deleted(n) for n in gone), footer("r1"), command="sync")
    got = summary(ledger)
    assert got["deletes"]["total"] == len(gone)
    assert got["deletes"]["names"] == gone[: sync_audit.DELETED_LISTED]
    assert got["actions"] == {"delete/deleted": len(gone)}
    text = run_main(ledger)[0].decode()
    assert f"and {len(gone) - render.DELETED_SHOWN} more" in text
