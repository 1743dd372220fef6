"""Manifest step, the short path: a line that is already its own canonical body is judged
with less work, and exactly as the full rules judge it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import cli_env, run_worker
from worker.manifest.validate import parse_line
from worker.manifest.values import Group

WHERE = Path("m.jsonl")

CANONICAL_LOOKING = [
    # valid, already canonical
    '{"Name":"组1","ProjectName":"default"}',
    '{"Name":"A1","ProjectName":"p","Tags":[{"Key":"k","Value":"v","Category":"Custom"}]}',
    '{"Name":"A1","ProjectName":"p","Tags":[{"Key":"","Value":"","Category":"System"},'
    '{"Key":"k2","Value":"批次","Category":"Custom"}]}',
    # valid, yet not their canonical body: the short path must hand them on
    '{"Name":"A1","ProjectName":"p","Tags":[]}',
    '{"Name":"A1"}',
    '{"ProjectName":"p","Name":"A1"}',
    '{"Name":"A1","ProjectName":"p","Tags":[{"Value":"v","Key":"k","Category":"Custom"}]}',
    '{"Name":"\\u0041\\u0031","ProjectName":"p"}',
    # keys given twice: orjson keeps one, so the re-encoded line is shorter
    '{"Name":"A1","ProjectName":"p","ProjectName":"p"}',
    '{"Name":"A1","Name":"A1","ProjectName":"p"}',
    '{"Name":"A1","ProjectName":"p","Tags":[{"Key":"k","Key":"k","Value":"v","Category":"Custom"}]}',
    # invalid in every way the short path looks at
    '{"Name":"A-1","ProjectName":"p"}',
    '{"Name":"","ProjectName":"p"}',
    '{"Name":"' + "A" * 21 + '","ProjectName":"p"}',
    '{"Name":1,"ProjectName":"p"}',
    '{"Name":"A1","ProjectName":""}',
    '{"Name":"A1","ProjectName":null}',
    '{"Name":"A1","ProjectName":"p","Tags":{}}',
    '{"Name":"A1","ProjectName":"p","Tags":[1]}',
    '{"Name":"A1","ProjectName":"p","Tags":[{"Key":"k","Value":"v","Category":"Other"}]}',
    '{"Name":"A1","ProjectName":"p","Tags":[{"Key":1,"Value":"v","Category":"Custom"}]}',
    '{"Name":"A1","ProjectName":"p","Tags":[{"Key":"k","Value":null,"Category":"Custom"}]}',
    '{"Name":"A1","ProjectName":"p","Tags":[{"Key":"k","Value":"v"}]}',
    '{"Name":"A1","ProjectName":"p","Tags":[{"Key":"k","Value":"v","Category":"Custom","X":1}]}',
    '{"Name":"A1","ProjectName":"p","Extra":1}',
]


def spaced(line: str) -> bytes:
    """The same object spelled with spaces: never canonical, so judged by the full rules."""
    return line.replace('":', '": ').replace(",", ", ").encode()


@pytest.mark.parametrize("line", CANONICAL_LOOKING)
def test_the_short_path_judges_as_the_full_rules_do(line: str) -> None:
    """A canonical-looking line gets the verdict, body and fingerprint that the same object
    spelled otherwise gets from the full rules; problems are the same, field for field."""
    fast = parse_line(WHERE, 3, line.encode())
    full = parse_line(WHERE, 3, spaced(line))
    if isinstance(full, Group):
        assert isinstance(fast, Group)
        assert (fast.name, fast.line, fast.body, fast.fingerprint) == (
            full.name,
            full.line,
            full.body,
            full.fingerprint,
        )
    else:
        assert isinstance(fast, list) and isinstance(full, list)
        assert [(p.field, p.reason) for p in fast] == [(p.field, p.reason) for p in full]


def test_repeated_keys_in_canonical_lines_are_refused(tmp_path: Path) -> None:
    """Through the CLI: lines spelled exactly as their canonical body, but with a key given
    twice or a Name given on two lines, are refused by name and line, exit 2."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        '{"Name":"A1","ProjectName":"p"}\n'
        '{"Name":"A2","Name":"A2","ProjectName":"p"}\n'
        '{"Name":"A1","ProjectName":"p"}\n'
        '{"Name":"A3","ProjectName":"p","Tags":[{"Key":"k","Value":"v","Category":"Custom",'
        '"Category":"Custom"}]}\n',
        encoding="utf-8",
    )
    got = run_worker("validate", str(manifest), env=cli_env(tmp_path))
    assert got.returncode == 2, got.stderr
    out = got.stdout + got.stderr
    assert f"{manifest}:2: Name: is given twice in one object" in out
    assert f"{manifest}:3: Name: 'A1' is already given on line 1" in out
    assert f"{manifest}:4: Tags[0].Category: is given twice in one object" in out


def test_the_duplicate_check_finds_exactly_the_repeated_hashes() -> None:
    """Only the 32 bits are kept: hashes equal in them are repeats, wherever they fall
    among the buckets; hashes added once are not."""
    from worker.manifest.duplicates import Hashes

    hashes = Hashes()
    for h in [1, 2, 3, 2, 0xFF00_0001, 0xFF00_0001, 1 << 40 | 3, -1, 0xFFFF_FFFF]:
        hashes.add(h)
    assert hashes.repeated() == {2, 0xFF00_0001, 3, 0xFFFF_FFFF}
