"""Manifest step: every problem named as FILE:LINE: FIELD: reason; the source read exactly once
into a private spool that every later pass reads instead."""

from __future__ import annotations

import asyncio
import errno
import gc
import io
import os
import socket
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest

from worker.api import spec
from worker.api.signing import Credentials, sign
from worker.errors import Exit, LedgerWriteError, ManifestError, SpoolError
from worker.manifest.source import scan
from worker.manifest.spool import read
from worker.manifest.values import MAX_SKIPPED_LINE_BYTES, Group, Invalid, Scan
from worker.sandbox import SandboxConfig, serve

CORPUS = Path(__file__).parent / "hostile_manifests"


def problems_of(path: Path) -> list[str]:
    with scan(path) as result:
        return [str(p) for p in result.problems]


def groups_of(result: Scan) -> list[tuple[str, int, bytes]]:
    return [(i.name, i.line, i.body) for i in read(result) if isinstance(i, Group)]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_valid_manifest_with_bom_crlf_and_blank_lines(tmp_path: Path) -> None:
    """A BOM, CRLF line ends and blank lines are accepted; line numbers stay true."""
    path = tmp_path / "m.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf"
        + '{"Name":"\u534e\u5317A"}\r\n\r\n  \n{"Name":"B2","ProjectName":"p",'
        '"Tags":[{"Key":"k","Value":"v","Category":"System"}]}\r\n'.encode()
    )
    with scan(path) as result:
        assert result.problem_count == 0 and result.groups == 2 and result.invalid == 0
        assert result.size == path.stat().st_size
        items = list(read(result))
    assert [(i.name, i.line) for i in items if isinstance(i, Group)] == [("华北A", 1), ("B2", 4)]
    first = items[0]
    assert isinstance(first, Group)
    assert first.payload == {"Name": "华北A", "ProjectName": "default"}  # default filled in


def test_fingerprint_is_canonical(tmp_path: Path) -> None:
    """Key order and spacing do not change the fingerprint; the content does."""
    a = tmp_path / "a.jsonl"
    a.write_text(
        '{"ProjectName": "default", "Name": "X1"}\n{"Name":"X2"}\n{"Name":"X3","Tags":[]}\n'
    )
    b = tmp_path / "b.jsonl"
    b.write_text(
        '{"Name":"X1","ProjectName":"default"}\n{"Name":"X2","ProjectName":"other"}\n{"Name":"X3"}\n'
    )
    with scan(a) as sa, scan(b) as sb:
        fa = [g.fingerprint for g in read(sa) if isinstance(g, Group)]
        fb = [g.fingerprint for g in read(sb) if isinstance(g, Group)]
    assert fa[0] == fb[0] and fa[1] != fb[1] and fa[2] == fb[2]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
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
        (
            '{"Name": "ok", "Tags": [{"Value": "v", "Category": "Custom"}]}',
            "Tags[0].Key: is required",
        ),
        (
            '{"Name": "ok", "Tags": [{"Key": "k", "Value": "v", "Category": "custom"}]}',
            "Tags[0].Category: must be 'System' or 'Custom'",
        ),
        ('{"Name": "ok", "Colour": "red"}', "Colour: unknown field"),
        ("[1, 2]", "line: must be a JSON object, not an array"),
        ('"text"', "line: must be a JSON object, not a string"),
        ('{"Name": "ok"', "line: is not valid JSON"),
        # a key given twice: parsers disagree on which counts, so it is refused, wherever
        # it is and however it is written
        ('{"Name": "Ok1", "Name": "Ok2"}', "Name: is given twice in one object"),
        ('{"Name":"Ok1","Name":"Ok2"}', "Name: is given twice in one object"),
        ('{"Name": "Ok1", "Name" : "Ok2"}', "Name: is given twice in one object"),
        ('{"Name": "Ok1", "\\u004eame": "Ok2"}', "Name: is given twice in one object"),
        ('{"Name": "ok", "Tags": [], "Tags": []}', "Tags: is given twice in one object"),
        (
            '{"Name": "ok", "Tags": [{"Key": "k", "Value": "v", "Category": "Custom"}, '
            '{"Key": "k", "Key": "j", "Value": "v", "Category": "Custom"}]}',
            "Tags[1].Key: is given twice in one object",
        ),
    ],
)
def test_each_problem_is_named(tmp_path: Path, line: str, expected: str) -> None:
    """A bad line is reported with file, line number, field and a reason."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"Name": "Good1"}\n' + line + "\n", encoding="utf-8")
    found = problems_of(path)
    assert any(p.startswith(f"{path}:2: ") and expected in p for p in found), found


@pytest.mark.parametrize(
    ("char", "allowed"),
    [
        ("\u4e00", True),  # first of the Live API's class
        ("\u9fa5", True),  # last of it
        ("\u3400", False),  # CJK Extension A: the API refuses it
        ("\u4dbf", False),  # last of Extension A
        ("\u9fa6", False),  # first code point after the API's class
        ("\u9fff", False),  # last of the Unified Ideographs block
        ("\U00020000", False),  # Extension B
        ("〇", False),  # U+3007, an ideographic zero outside the class
    ],
)
def test_chinese_characters_are_exactly_u4e00_to_u9fa5(char: str, allowed: bool) -> None:
    """Names follow the Live API's class \\u4e00-\\u9fa5 exactly; a refusal names the character
    and its code point."""
    reason = spec.name_problem(f"群组{char}")
    if allowed:
        assert reason is None
    else:
        assert reason is not None
        assert f"{char!r} (U+{ord(char):04X}) is not one" in reason


@pytest.mark.parametrize(
    "line",
    [
        '{"Name": "Ok1", "ProjectName": "p\\",\\"Name\\":\\"x"}',  # quotes inside a value
        '{"Name" : "Ok1" , "ProjectName" : "p"}',  # spaces before colons
        '{"Name": "Ok1", "Tags": [{"Key": "Name", "Value": "Name", "Category": "Custom"}]}',
        '{"Name": "Ok1", "Tags": [{"Key": "k", "Value": "v", "Category": "Custom"}, '
        '{"Key": "k", "Value": "v", "Category": "Custom"}]}',  # same keys, other objects
    ],
)
def test_keys_that_only_look_repeated_are_not_refused(tmp_path: Path, line: str) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    assert not any("twice" in p for p in problems_of(path))


def test_problem_fields_and_values_never_carry_terminal_escapes(tmp_path: Path) -> None:
    """An unknown key or a bad value holding escapes or megabytes is shown as a short repr."""
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"Name": "ok1", "\\u001b[2Jx": 1}\n'
        '{"Name": "ok2", "Tags": [{"Key": "k", "Value": "v", "Category": "' + "C" * 5000 + '"}]}\n'
    )
    found = problems_of(path)
    assert found[0] == f"{path}:1: '\\x1b[2Jx': unknown field (allowed: Name, ProjectName, Tags)"
    assert "\x1b" not in "".join(found)
    assert len(found[1]) < len(str(path)) + 150


def test_duplicates_nul_and_invalid_utf8(tmp_path: Path) -> None:
    """A repeated Name names the first line; NUL bytes and bad UTF-8 are named too."""
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"Name":"A1"}\n{"Name":"A1"}\n{"Name":"A\x002"}\n{"Name":"\xff"}\n')
    found = problems_of(path)
    assert f"{path}:2: Name: 'A1' is already given on line 1" in found
    assert any(p.startswith(f"{path}:3: line: holds a NUL byte") for p in found)
    assert any(p.startswith(f"{path}:4: line: is not valid UTF-8") for p in found)


def test_invalid_lines_are_read_back_with_their_name_and_first_problem(tmp_path: Path) -> None:
    """`read` yields each invalid line as scan judged it: line, usable Name, first problem."""
    path = tmp_path / "m.jsonl"
    path.write_text('{"Name":"A1"}\n\n{"Name":"A1"}\n{"Name":"a-b","Extra":1}\n[1]\n')
    with scan(path) as result:
        items = list(read(result))
    assert result.invalid == 3 and result.problem_count == 4
    invalid = [(i.line, i.name, i.problem.field) for i in items if isinstance(i, Invalid)]
    assert invalid == [(3, "A1", "Name"), (4, "a-b", "Extra"), (5, None, "line")]


def test_long_line_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    """A line over 1 MiB is one problem; the lines after it keep their numbers."""
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"Name":"' + b"a" * (2 << 20) + b'"}\n{"Name":"after"}\n')
    with scan(path) as result:
        assert [str(p) for p in result.problems] == [
            f"{path}:1: line: is longer than 1048576 bytes"
        ]
        assert result.groups == 1
        assert [(i.line, type(i).__name__) for i in read(result)] == [(1, "Invalid"), (2, "Group")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "holds no groups"),
        (b"\n  \n\r\n", "holds no groups"),
    ],
)
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
    assert str(info.value.problems[0]) == f"{tmp_path / 'nope.jsonl'}: no such file"
    with pytest.raises(ManifestError) as info:
        scan(tmp_path)
    assert str(info.value.problems[0]) == f"{tmp_path}: is a directory, not a file"


def test_socket_is_refused_by_name(tmp_path: Path) -> None:
    """A Unix socket given as the manifest is a file-level error naming it."""
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        with pytest.raises(ManifestError) as info:
            scan(path)
    assert str(info.value.problems[0]) == f"{path}: is a socket, not a file"


def test_device_that_never_ends_is_stopped() -> None:
    """/dev/zero (one endless line) ends in a file-level error after a bounded read."""
    with pytest.raises(ManifestError) as info:
        scan(Path("/dev/zero"))
    assert str(info.value.problems[0]) == (
        f"/dev/zero: line 1 is longer than {MAX_SKIPPED_LINE_BYTES} bytes: this is not a JSONL manifest"
    )


def test_source_larger_than_the_cap_is_refused(tmp_path: Path) -> None:
    """The total size cap ends a source of many short lines too, naming the file."""
    path = tmp_path / "m.jsonl"
    path.write_text("".join(f'{{"Name":"N{i}"}}\n' for i in range(100)))
    with pytest.raises(ManifestError) as info:
        scan(path, max_bytes=500)
    assert str(info.value.problems[0]).startswith(f"{path}: is larger than 500 bytes")


def test_problem_count_is_capped_but_counted(tmp_path: Path) -> None:
    """Thousands of bad lines: 50 shown, all counted, every invalid line known for --skip-invalid."""
    path = tmp_path / "m.jsonl"
    path.write_text("".join(f'{{"Name": "bad-{i}"}}\n' for i in range(3000)) + '{"Name":"ok"}\n')
    with scan(path) as result:
        assert len(result.problems) == 50 and result.problem_count == 3000
        items = list(read(result))
    assert sum(isinstance(i, Invalid) for i in items) == 3000
    assert sum(isinstance(i, Group) for i in items) == 1


def test_edits_after_scan_change_nothing_that_is_read(tmp_path: Path) -> None:
    """Lines appended, an edit in place, even deleting the source after scan: read yields
    exactly what scan validated, from the same bytes."""
    path = tmp_path / "m.jsonl"
    path.write_text('{"Name":"A1"}\n{"Name":"B2"}\n')
    with scan(path) as result:
        before = groups_of(result)
        with path.open("ab") as f:
            f.write(b'{"Name":"A1"}\n{"Name":"bad-line"}\n')  # a duplicate and an invalid line
        with path.open("r+b") as f:
            f.write(b'{"Name":"ZZ"}\n{"Name":"B')  # same length, other content
        assert groups_of(result) == before
        path.unlink()
        assert (
            groups_of(result)
            == before
            == [
                ("A1", 1, b'{"Name":"A1","ProjectName":"default"}'),
                ("B2", 2, b'{"Name":"B2","ProjectName":"default"}'),
            ]
        )


def test_read_passes_are_independent(tmp_path: Path) -> None:
    """Two passes interleaved (plan, then send) each see every line once, in order."""
    path = tmp_path / "m.jsonl"
    path.write_text("".join(f'{{"Name":"N{i}"}}\n' for i in range(5000)))
    with scan(path) as result:
        one, two = read(result), read(result)
        pairs = list(zip(one, two, strict=True))
    assert len(pairs) == 5000 and all(a == b for a, b in pairs)
    assert [a.line for a, _ in pairs] == list(range(1, 5001))


def test_spool_is_private_unlinked_and_closed_with_the_scan(tmp_path: Path) -> None:
    """The spool is mode 0600 in the folder given, has no name to leak (gone even after a
    crash), and its descriptor is closed by close()."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"Name":"A1"}\n')
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    before = open_fds()
    with scan(manifest, spool_dir=spool_dir) as result:
        info = os.fstat(result.spool.fileno())
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_nlink == 0
        assert info.st_dev == spool_dir.stat().st_dev
        assert list(spool_dir.iterdir()) == []
    assert result.spool.closed and open_fds() == before


def test_spool_folder_that_cannot_be_used_is_a_clear_error(tmp_path: Path) -> None:
    """A spool folder that does not exist is a file-level error naming it."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"Name":"A1"}\n')
    with pytest.raises(ManifestError) as info:
        scan(manifest, spool_dir=tmp_path / "nope")
    assert f"cannot create a spool file in {tmp_path / 'nope'}" in str(info.value.problems[0])


def test_failed_scan_leaks_no_descriptor(tmp_path: Path) -> None:
    """A scan that fails (empty file, too large) closes the source and the spool."""
    empty = tmp_path / "m.jsonl"
    empty.write_bytes(b"\n")
    before = open_fds()
    for attempt in ({"path": empty}, {"path": Path("/dev/zero")}):
        with pytest.raises(ManifestError):
            scan(**attempt)  # type: ignore[arg-type]
    assert open_fds() == before


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[tuple[Path, list[threading.Thread]]]:
    path = tmp_path / "pipe.jsonl"
    os.mkfifo(path)
    writers: list[threading.Thread] = []
    yield path, writers
    for w in writers:
        w.join(timeout=10)


def test_fifo_is_read_once_and_every_pass_sees_it_all(
    fifo: tuple[Path, list[threading.Thread]],
) -> None:
    """A named pipe validates and then reads back every line, twice: no pass reads the
    exhausted stream."""
    path, writers = fifo
    data = "".join(f'{{"Name":"N{i}"}}\n' for i in range(2000)).encode()

    def write() -> None:
        with path.open("wb") as f:
            f.write(data)

    writers.append(threading.Thread(target=write))
    writers[0].start()
    with scan(path) as result:
        assert result.groups == 2000 and result.size == len(data)
        assert len(groups_of(result)) == 2000 and len(groups_of(result)) == 2000


@pytest.mark.parametrize(
    "name",
    [
        "37-name-cjk-extension-a.jsonl",
        "38-name-past-u9fa5.jsonl",
        "39-unknown-field-terminal-escape.jsonl",
    ],
)
def test_hostile_corpus_additions(name: str) -> None:
    """The corpus files this module added are refused on line 2, without a raw escape."""
    found = problems_of(CORPUS / name)
    assert len(found) == 1 and f"{name}:2: " in found[0] and "\x1b" not in found[0]


NAMES_AT_THE_EDGES = [
    "群组\u4e00",
    "群组\u9fa5",
    "群组\u3400",
    "群组\u4dbf",
    "群组\u9fa6",
    "群组\u9fff",
    "群组\U00020000",
    "群组〇",
    "Ab09",
    "ａ1",
    "１2",
    "a-b",
    "a_b",
    "a b",
    "a\u00e9",
    "直播🎉",
    "",
    "x" * 20,
    "x" * 21,
]


def test_sandbox_refuses_exactly_what_the_validator_refuses() -> None:
    """Over HTTP, the in-process sandbox creates a Name iff spec.name_problem accepts it, and
    refuses the rest with InvalidParam: the two rules cannot drift apart."""
    creds = Credentials(access_key="AKNAMES", secret_key="SKnames")

    async def create(session: aiohttp.ClientSession, url: str, name: str) -> tuple[int, str]:
        body = orjson.dumps({"Name": name, "ProjectName": "default"})
        query = {"Action": spec.CREATE, "Version": spec.VERSION}
        headers = sign(
            method="POST",
            host=urlsplit(url).netloc,
            path="/",
            query=query,
            content_type="application/json",
            body=body,
            credentials=creds,
            region=spec.DEFAULT_REGION,
            now=datetime.now(UTC),
        )
        async with session.post(
            url, params=query, data=body, headers=headers, allow_redirects=False
        ) as resp:
            meta = orjson.loads(await resp.read())["ResponseMetadata"]
            return resp.status, meta.get("Error", {}).get("Code", "")

    async def main() -> list[tuple[str, tuple[int, str]]]:
        config = SandboxConfig(rate=1000, keys={creds.access_key: creds.secret_key})
        async with serve(config) as sb, aiohttp.ClientSession() as session:
            return [(n, await create(session, sb.url, n)) for n in NAMES_AT_THE_EDGES]

    for name, answer in asyncio.run(main()):
        expected = (200, "") if spec.name_problem(name) is None else (400, "InvalidParam")
        assert answer == expected, (name, answer)


# -- a spool on a disk that fails ------------------------------------------------------------


def _cannot_create(err: int) -> Callable[[Path | None], IO[bytes]]:
    def opener(folder: Path | None) -> IO[bytes]:
        raise OSError(err, os.strerror(err))

    return opener


def _full_disk(folder: Path | None) -> IO[bytes]:
    """A spool on a full disk: every write (or the flush of one) fails with ENOSPC."""
    return open("/dev/full", "r+b")  # the Scan closes it


def _write_only(folder: Path | None) -> IO[bytes]:
    """A spool that takes every write and cannot be read back (EBADF: opened write-only),
    like a disk that fails on read."""
    assert folder is not None
    return open(folder / f"spool-{len(list(folder.iterdir()))}", "wb")  # the Scan closes it


class _CloseFails(io.FileIO):
    def close(self) -> None:
        first = not self.closed
        super().close()
        if first:
            raise OSError(errno.EIO, os.strerror(errno.EIO))


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT])
def test_a_spool_that_cannot_be_created_names_the_manifest_and_its_folder(
    tmp_path: Path, err: int
) -> None:
    """No spool file can be made in the folder (full, read-only, forbidden, over quota): a
    ManifestError (exit 2: nothing sent) naming the manifest, the folder and the reason."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"Name":"A1"}\n')
    with pytest.raises(ManifestError) as info:
        scan(manifest, spool_dir=tmp_path, open_spool=_cannot_create(err))
    assert info.value.exit_code == Exit.USAGE
    assert str(info.value.problems[0]) == (
        f"{manifest}: cannot create a spool file in {tmp_path}: {os.strerror(err)}"
    )


@pytest.mark.parametrize("lines", [3, 5000], ids=["the flush fails", "a write fails"])
def test_a_spool_on_a_full_disk_is_a_manifest_error_and_leaks_nothing(
    tmp_path: Path, lines: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing the spool fails (ENOSPC), in the last flush or mid-scan: one ManifestError
    naming the manifest, the folder and the reason; no descriptor is left open and no
    finalizer complains later (closing the unflushable buffer again must stay quiet)."""
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(f'{{"Name":"N{i}"}}\n' for i in range(lines)))
    before = open_fds()
    with pytest.raises(ManifestError) as info:
        scan(manifest, spool_dir=tmp_path, open_spool=_full_disk)
    gc.collect()
    assert str(info.value.problems[0]) == (
        f"{manifest}: cannot write its private spool file in {tmp_path}: No space left on device"
    )
    assert open_fds() == before and unraisable == []


def test_a_spool_that_cannot_be_read_back_while_scanning_is_a_manifest_error(
    tmp_path: Path,
) -> None:
    """The duplicate check reads the spool back: a read that fails there is still a
    ManifestError (nothing was sent), naming the folder and the reason."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"Name":"A1"}\n{"Name":"A1"}\n')
    spools = tmp_path / "spools"
    spools.mkdir()
    before = open_fds()
    with pytest.raises(ManifestError) as info:
        scan(manifest, spool_dir=spools, open_spool=_write_only)
    assert str(info.value.problems[0]) == (
        f"{manifest}: cannot read back its private spool file in {spools}: Bad file descriptor"
    )
    assert open_fds() == before


def test_a_spool_that_cannot_be_read_during_the_run_stops_it_truthfully(tmp_path: Path) -> None:
    """A spool read that fails while `read` feeds a run (requests may be out) is not a
    ManifestError, whose exit 2 says nothing was sent: it is a SpoolError, a
    LedgerWriteError (exit 7) naming the manifest, the folder and the reason."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"Name":"A1"}\n{"Name":"B2"}\n')
    spools = tmp_path / "spools"
    spools.mkdir()
    with scan(manifest, spool_dir=spools, open_spool=_write_only) as scanned:
        assert scanned.groups == 2
        with pytest.raises(SpoolError) as info:
            list(read(scanned))
    assert isinstance(info.value, LedgerWriteError) and info.value.exit_code == Exit.STOPPED
    assert str(info.value) == (
        f"{manifest}: cannot read back its private spool file in {spools}: Bad file "
        "descriptor; the ledger is consistent: run the same command again"
    )


def test_a_spool_whose_close_fails_after_a_good_scan_closes_quietly(tmp_path: Path) -> None:
    """Closing the spool after the run (EIO from close) raises nothing: it is an unlinked
    scratch copy, nothing in it is needed any more, and the run's outcome stands."""

    def opener(folder: Path | None) -> IO[bytes]:
        fd, name = tempfile.mkstemp(dir=folder)
        os.unlink(name)
        return _CloseFails(fd, "r+")

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"Name":"A1"}\n')
    before = open_fds()
    with scan(manifest, spool_dir=tmp_path, open_spool=opener) as scanned:
        assert [g.name for g in read(scanned) if isinstance(g, Group)] == ["A1"]
    assert scanned.spool.closed and open_fds() == before
