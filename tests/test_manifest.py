"""Manifest validation: every problem named as FILE:LINE: FIELD: reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.errors import ManifestError
from worker.manifest import Group, Invalid, read, scan


def problems_of(path: Path) -> list[str]:
    return [str(p) for p in scan(path).problems]


def test_valid_manifest_with_bom_crlf_and_blank_lines(tmp_path: Path) -> None:
    """A BOM, CRLF line ends and blank lines are accepted; line numbers stay true."""
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"Name":"\u534e\u5317A"}\r\n\r\n  \n{"Name":"B2","ProjectName":"p",'
                     '"Tags":[{"Key":"k","Value":"v","Category":"System"}]}\r\n'.encode())
    result = scan(path)
    assert result.problem_count == 0 and result.groups == 2
    items = list(read(result))
    assert [(i.name, i.line) for i in items if isinstance(i, Group)] == [("华北A", 1), ("B2", 4)]
    first = items[0]
    assert isinstance(first, Group)
    assert first.payload == {"Name": "华北A", "ProjectName": "default"}  # default filled in


def test_fingerprint_is_canonical(tmp_path: Path) -> None:
    """Key order and spacing do not change the fingerprint; the content does."""
    a = tmp_path / "a.jsonl"
    a.write_text('{"ProjectName": "default", "Name": "X1"}\n{"Name":"X2"}\n{"Name":"X3","Tags":[]}\n')
    b = tmp_path / "b.jsonl"
    b.write_text('{"Name":"X1","ProjectName":"default"}\n{"Name":"X2","ProjectName":"other"}\n{"Name":"X3"}\n')
    fa = [g.fingerprint for g in read(scan(a)) if isinstance(g, Group)]
    fb = [g.fingerprint for g in read(scan(b)) if isinstance(g, Group)]
    assert fa[0] == fb[0] and fa[1] != fb[1] and fa[2] == fb[2]


@pytest.mark.parametrize(("line", "expected"), [
    ('{"Name": ""}', "Name: must not be empty"),
    ('{"Name": "' + "a" * 21 + '"}', "Name: is 21 characters long"),
    ('{"Name": "a-b"}', "Name: may hold only"),
    ('{"Name": "a b"}', "Name: may hold only"),
    ('{"Name": "１２"}', "Name: may hold only"),
    ('{"Name": "ok😀"}', "Name: may hold only"),
    ('{"Name": null}', "Name: must be a string, not null"),
    ('{"ProjectName": "p"}', "Name: is required"),
    ('{"Name": "ok", "ProjectName": 5}', "ProjectName: must be a string, not a number"),
    ('{"Name": "ok", "Tags": {}}', "Tags: must be a list of objects, not an object"),
    ('{"Name": "ok", "Tags": [{"Value": "v", "Category": "Custom"}]}', "Tags[0].Key: is required"),
    ('{"Name": "ok", "Tags": [{"Key": "k", "Value": "v", "Category": "custom"}]}',
     "Tags[0].Category: must be 'System' or 'Custom'"),
    ('{"Name": "ok", "Colour": "red"}', "Colour: unknown field"),
    ('[1, 2]', "line: must be a JSON object, not an array"),
    ('"text"', "line: must be a JSON object, not a string"),
    ('{"Name": "ok"', "line: is not valid JSON"),
])
def test_each_problem_is_named(tmp_path: Path, line: str, expected: str) -> None:
    """A bad line is reported with file, line number, field and a reason."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"Name": "Good1"}\n' + line + "\n", encoding="utf-8")
    found = problems_of(path)
    assert any(p.startswith(f"{path}:2: ") and expected in p for p in found), found


def test_duplicates_nul_and_invalid_utf8(tmp_path: Path) -> None:
    """A repeated Name names the first line; NUL bytes and bad UTF-8 are named too."""
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"Name":"A1"}\n{"Name":"A1"}\n{"Name":"A\x002"}\n{"Name":"\xff"}\n')
    found = problems_of(path)
    assert f"{path}:2: Name: 'A1' is already given on line 1" in found
    assert any(p.startswith(f"{path}:3: line: holds a NUL byte") for p in found)
    assert any(p.startswith(f"{path}:4: line: is not valid UTF-8") for p in found)


def test_long_line_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    """A line over 1 MiB is one problem; the lines after it keep their numbers."""
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"Name":"' + b"a" * (2 << 20) + b'"}\n{"Name":"after"}\n')
    result = scan(path)
    assert [str(p) for p in result.problems] == [f"{path}:1: line: is longer than 1048576 bytes"]
    assert result.groups == 1


@pytest.mark.parametrize(("content", "message"), [
    (b"", "holds no groups"),
    (b"\n  \n\r\n", "holds no groups"),
])
def test_empty_files(tmp_path: Path, content: bytes, message: str) -> None:
    """An empty manifest is an error of the whole file."""
    path = tmp_path / "m.jsonl"
    path.write_bytes(content)
    with pytest.raises(ManifestError) as info:
        scan(path)
    assert message in str(info.value.problems[0])


def test_missing_file_and_directory(tmp_path: Path) -> None:
    """A missing file or a directory is a clear file-level error."""
    with pytest.raises(ManifestError, match="1 problem") as info:
        scan(tmp_path / "nope.jsonl")
    assert str(info.value.problems[0]).endswith("no such file")
    with pytest.raises(ManifestError) as info:
        scan(tmp_path)
    assert "is a directory" in str(info.value.problems[0])


def test_problem_count_is_capped_but_counted(tmp_path: Path) -> None:
    """Thousands of bad lines: 50 shown, all counted, every invalid line known for --skip-invalid."""
    path = tmp_path / "m.jsonl"
    path.write_text("".join(f'{{"Name": "bad-{i}"}}\n' for i in range(3000)) + '{"Name":"ok"}\n')
    result = scan(path)
    assert len(result.problems) == 50 and result.problem_count == 3000
    items = list(read(result))
    assert sum(isinstance(i, Invalid) for i in items) == 3000
    assert sum(isinstance(i, Group) for i in items) == 1
