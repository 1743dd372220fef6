"""Every Name an invalid manifest line could mean (line_names), carried by Invalid.names and
protected from `sync --prune`: unit tests of the reader and the plan, and the real CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli_env, run_worker, write_manifest
from worker.api.account import Listed
from worker.errors import PlanRefused, Problem
from worker.manifest.line_names import names_of
from worker.manifest.remembered import recall, remember
from worker.manifest.source import scan
from worker.manifest.spool import read
from worker.manifest.values import Invalid
from worker.plan import reconcile


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"Name":"Precious1","Name":"Precious1x"}', ("Precious1", "Precious1x")),
        (b'{"Name":"A1","Name":"A1"}', ("A1",)),
        (b'{"Na\\u006de":"Esc1","ProjectName":5}', ("Esc1",)),
        (b'{"Name":"Beside1","Tags":"not a list","Extra":1}', ("Beside1",)),
        (b'{"Name":"not valid!"}', ("not valid!",)),
        (b'{"Name":"a\\nb"}', ("a\nb",)),
        (b'{"Tags":[{"Name":"InATag"}],"Name":"Top1"}', ("Top1",)),
        (b'{"Tags":[{"Name":"InATag"}]}', ()),
        (b'{"Name":5,"Name":"Str1"}', ("Str1",)),
        (b'{"Name":5}', ()),
        (b'{"Name":"a",}', ()),
        (b'{"Name":"A","x":NaN}', ()),
        (b'[{"Name":"a"}]', ()),
        (b'{"Name":"\\ud800"}', ()),
        (b'\xff{"Name":"a"}', ()),
    ],
)
def test_names_of_reads_every_top_level_name_string(raw: bytes, expected: tuple[str, ...]) -> None:
    """Repeats, escapes, bad fields and bad Names count; nested "Name" keys, non-strings and
    lines the validator cannot read as a JSON object do not."""
    assert names_of(raw) == expected


def test_read_gives_each_invalid_line_every_name(tmp_path: Path) -> None:
    """scan/read carry the names through the spool, for a repeated key and for a duplicate
    Name's second line; the display Name stays orjson's (the last) one."""
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"Name":"P1","Name":"P1x"}\n{"Name":"D1"}\n{"Name":"D1"}\n{"Name":"a",}\n')
    with scan(path) as result:
        got = [(i.line, i.name, i.names) for i in read(result) if isinstance(i, Invalid)]
    assert got == [(1, "P1x", ("P1", "P1x")), (3, "D1", ("D1",)), (4, None, ())]


def test_a_remembered_spool_keeps_the_names(tmp_path: Path) -> None:
    """A validation recalled from beside the ledger yields the same names."""
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"Name":"P1","Name":"P1x"}\n{"Name":"Ok1"}\n')
    kept = tmp_path / "l.spool"
    with scan(path) as first:
        assert remember(first, kept) is None
    again = recall(path, kept)
    assert again is not None
    with again:
        assert [i.names for i in read(again) if isinstance(i, Invalid)] == [("P1", "P1x")]


def listed(name: str, project: str = "scratch") -> Listed:
    return Listed(name=name, project=project, tags=())


def test_prune_keeps_every_name_an_invalid_line_could_mean() -> None:
    """plan_sync protects each of Invalid.names; a line with none refuses the prune."""
    account = {n: listed(n) for n in ("Precious1", "Precious1x", "Extra1")}
    bad = Invalid(
        line=1,
        name="Precious1x",
        problem=Problem("m", 1, "Name", "given twice"),
        names=("Precious1", "Precious1x"),
    )
    scope = reconcile.Scope(projects=frozenset({"scratch"}))
    plan = reconcile.plan_sync([bad], account, prune=True, scope=scope)
    assert [d.name for d in plan.deletes] == ["Extra1"]
    nameless = Invalid(line=2, name=None, problem=Problem("m", 2, "line", "not JSON"))
    with pytest.raises(PlanRefused, match="no readable Name"):
        reconcile.plan_sync([nameless], account, prune=True, scope=scope)


def test_the_shown_name_is_always_protected() -> None:
    """An Invalid built with only a display Name protects it (names includes it)."""
    bad = Invalid(line=1, name="G4", problem=Problem("m", 1, "Tags", "x"))
    assert bad.names == ("G4",)


@pytest.mark.slow
def test_sync_prune_skip_invalid_deletes_no_name_a_line_could_mean(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """The real CLI: `sync --prune --skip-invalid` with a line giving Name twice, a line
    with an escaped Name key and a line with an invalid Name, against an account holding
    each of those Names and one true extra: only the extra is deleted."""
    account = [
        {"Name": n, "ProjectName": "scratch"}
        for n in ("Precious1", "Precious1x", "Esc1", "Extra1", "Keep1")
    ]
    preload = write_manifest(tmp_path / "preload.jsonl", account)
    sb = sandbox_factory("--rate", "50", "--preload", str(preload))
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(
        b'{"Name":"Keep1","ProjectName":"scratch"}\n'
        b'{"Name":"Precious1","Name":"Precious1x","ProjectName":"scratch"}\n'
        b'{"Na\\u006de":"Esc1","ProjectName":"scratch","Tags":{}}\n'
    )
    out = run_worker(
        "sync", str(manifest), "--endpoint", sb.url, "--rate", "50",
        "--prune", "--scope-project", "scratch", "--skip-invalid",
        env=cli_env(tmp_path),
    )  # fmt: skip
    assert out.returncode == 1, out.stderr  # invalid lines: exit 1, the rest is done
    assert [a["name"] for a in sb.of("DeletePullToPushGroup")] == ["Extra1"]
    groups = sb.groups()
    assert all(groups[n]["Status"] == 0 for n in ("Precious1", "Precious1x", "Esc1", "Keep1"))
    assert groups["Extra1"]["Status"] == 1
