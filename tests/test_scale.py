"""The ledger's on-disk index (worker/ledger/: index, table): derived, rebuilt when it cannot be trusted,
and never changing what a run decides. Behaviour only: the figures are in bench/scale.py."""

from __future__ import annotations

import errno
import gc
import hashlib
import os
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from tests.test_ledger import footer
from worker.ledger import index, layout, table
from worker.ledger.journal import Ledger
from worker.ledger.load import read_state, records_of
from worker.ledger.records import Action, Footer, Intent, Item, Outcome, Result, RunHeader, Target
from worker.ledger.state import State
from worker.ledger.table import Table
from worker.manifest.values import Group
from worker.plan import run_plan

TARGET = Target(endpoint="http://127.0.0.1:1", region="cn-north-1", access_key="AK")


def fp(name: str, version: int = 0) -> str:
    return hashlib.sha256(f"{name}/{version}".encode()).hexdigest()


def header(run_id: str) -> RunHeader:
    return RunHeader(
        run_id=run_id,
        started="t",
        version="0",
        command="run",
        target=TARGET,
        manifest="m.jsonl",
        manifest_sha256="0" * 64,
        items=0,
        plan={},
        settings={},
    )


def intent(run_id: str, name: str, line: int, version: int = 0) -> Intent:
    return Intent(
        run_id=run_id,
        action=Action.CREATE,
        name=name,
        line=line,
        fingerprint=fp(name, version),
        attempt=1,
        at="t",
        body={"Name": name},
    )


def result(
    run_id: str, name: str | None, line: int, outcome: Outcome, code: str = "", version: int = 0
) -> Result:
    return Result(
        run_id=run_id,
        action=None if outcome is Outcome.INVALID else Action.CREATE,
        name=name,
        outcome=outcome,
        status=None,
        code=code,
        message="",
        request_id="",
        sends=1,
        fingerprint=None if name is None else fp(name, version),
        line=line,
        started="t",
        finished="t",
    )


def history(run_id: str, n: int) -> list[RunHeader | Intent | Result | Footer]:
    """A run over n Names with every kind of latest word: done, rejected, deferred, in
    doubt, invalid, and a Name sent twice."""
    records: list[RunHeader | Intent | Result | Footer] = [header(run_id)]
    kinds = [
        Outcome.CREATED,
        Outcome.EXISTS,
        Outcome.REJECTED,
        Outcome.DEFERRED,
        None,
        Outcome.INVALID,
    ]
    for i in range(n):
        name, kind = f"组{i:05d}", kinds[i % len(kinds)]
        if kind is Outcome.INVALID:
            records.append(result(run_id, name, i + 1, kind))
            continue
        records.append(intent(run_id, name, i + 1))
        if kind is not None:
            records.append(
                result(run_id, name, i + 1, kind, code="Code" if kind is Outcome.REJECTED else "")
            )
    records.append(result(run_id, None, n + 1, Outcome.INVALID))
    records.append(footer(run_id))
    return records


def write_run(path: Path, records: list[RunHeader | Intent | Result | Footer]) -> None:
    with Ledger.open(path, target=TARGET) as book:
        for record in records:
            book.append(record)


def in_memory(path: Path) -> State:
    """The ledger folded record by record into a plain dict: what the index must equal."""
    state = State()
    for record in records_of(path):
        state.fold(record)
    return state


def manifest_items(n: int) -> list[Group]:
    """The run's Names, half of them changed since, plus Names the ledger never saw."""
    return [
        Group(name=f"组{i:05d}", line=i + 1, body=b"{}", fingerprint=fp(f"组{i:05d}", i % 2))
        for i in range(n + 5)
    ]


def decisions(state: State, items: list[Group]) -> list[tuple[str, str]]:
    return [(item.name, run_plan.decide(item, state.latest).why) for item in items]


def same_state(got: State, want: State) -> None:
    assert isinstance(got.latest, Table)
    assert dict(got.latest.items()) == dict(want.latest.items())
    assert len(got.latest) == len(want.latest)
    assert got.runs == want.runs and got.footers == want.footers
    assert got.invalid_lines == want.invalid_lines


def test_a_resume_with_the_index_plans_as_one_without(tmp_path: Path) -> None:
    """The index a run leaves, a private one built from scratch and a plain fold of every
    record give the same latest word per Name and the same plan, line by line."""
    path = tmp_path / "l.jsonl"
    write_run(path, history("r1", 60))
    write_run(
        path,
        [
            header("r2"),
            intent("r2", "组00002", 3, 1),
            result("r2", "组00002", 3, Outcome.CREATED, version=1),
            footer("r2"),
        ],
    )
    assert index.index_path(path).exists()
    want = in_memory(path)
    items = manifest_items(60)
    with_index = read_state(path)
    assert isinstance(with_index.latest, Table) and with_index.latest.path is not None
    same_state(with_index, want)
    os.unlink(index.index_path(path))
    without = read_state(path)  # a private index: nothing written beside the ledger
    assert not index.index_path(path).exists()
    assert isinstance(without.latest, Table) and without.latest.path is None
    same_state(without, want)
    assert decisions(with_index, items) == decisions(without, items) == decisions(want, items)
    counted = Counter(why for _, why in decisions(with_index, items))
    assert set(counted) == {
        "done",
        "done_changed",
        "rejected_unchanged",
        "fixed",
        "deferred",
        "in_doubt",
        "new",
    }


def test_the_index_is_rebuilt_after_it_is_deleted(tmp_path: Path) -> None:
    """A run whose index was deleted rebuilds it from the ledger and leaves it current."""
    path = tmp_path / "l.jsonl"
    write_run(path, history("r1", 30))
    os.unlink(index.index_path(path))
    with Ledger.open(path, target=TARGET) as book:
        same_state(book.state, in_memory(path))
    assert index.index_path(path).exists()
    same_state(read_state(path), in_memory(path))


@pytest.mark.parametrize(
    "damage",
    ["garbage header", "cut short", "trailer garbage", "empty file", "other version"],
)
def test_a_damaged_index_is_rebuilt(tmp_path: Path, damage: str) -> None:
    """Whatever happened to the index file, readers and the next run get the ledger's word."""
    path = tmp_path / "l.jsonl"
    write_run(path, history("r1", 30))
    ipath = index.index_path(path)
    data = bytearray(ipath.read_bytes())
    match damage:
        case "garbage header":
            data[:64] = os.urandom(64)
        case "cut short":
            del data[len(data) // 2 :]
        case "trailer garbage":
            data[-20:] = b"x" * 20
        case "empty file":
            data.clear()
        case "other version":
            data[7] ^= 0xFF
    ipath.write_bytes(bytes(data))
    want = in_memory(path)
    same_state(read_state(path), want)
    with Ledger.open(path, target=TARGET) as book:
        same_state(book.state, want)
    assert ipath.read_bytes()[:8] == layout.MAGIC


def test_an_index_from_another_ledger_is_not_trusted(tmp_path: Path) -> None:
    """An index copied beside another ledger, even one with the same bytes, is ignored."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_run(a, history("r1", 30))
    write_run(b, [header("r9"), intent("r9", "组00000", 1), footer("r9")])
    index.index_path(b).write_bytes(index.index_path(a).read_bytes())
    got = read_state(b)
    same_state(got, in_memory(b))
    assert got.latest.get("组00001") is None
    twin = tmp_path / "twin.jsonl"  # same bytes, another file: its own inode
    twin.write_bytes(a.read_bytes())
    index.index_path(twin).write_bytes(index.index_path(a).read_bytes())
    os.utime(twin, ns=(os.stat(a).st_atime_ns, os.stat(a).st_mtime_ns))
    same_state(read_state(twin), in_memory(a))


def test_records_appended_behind_the_index_are_read(tmp_path: Path) -> None:
    """A ledger that grew or was edited without the index (another tool, an older version)
    is read as the ledger says: readers build a private index, a run extends or rebuilds."""
    path = tmp_path / "l.jsonl"
    write_run(path, history("r1", 12))
    with path.open("ab") as f:
        f.write(orjson.dumps(result("r1", "组00004", 5, Outcome.CREATED)) + b"\n")
    assert read_state(path).latest["组00004"].done
    with Ledger.open(path, target=TARGET) as book:
        assert book.state.latest["组00004"].done
    edited = path.read_bytes().replace(b'"outcome":"created"', b'"outcome":"deferred"')
    path.write_bytes(edited)  # same size, new mtime: the ledger's word wins
    assert not read_state(path).latest["组00004"].done
    with Ledger.open(path, target=TARGET) as book:
        same_state(book.state, in_memory(path))


def _killed_run(path: Path, body: str) -> None:
    """A child process that opens the ledger as a run does, runs `body` (with `book`,
    `header`, `intent`, `result`, `Outcome` and `ledger` at hand) and dies as `kill -9`
    would (no close, no footer)."""
    code = f"""
import os
from pathlib import Path
from tests.test_scale import TARGET, header, intent, result
from worker.ledger import journal
from worker.ledger.journal import Ledger
from worker.ledger.records import Outcome
book = Ledger.open(Path({str(path)!r}), target=TARGET)
{body}
os._exit(9)
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=Path(__file__).parents[1],
        text=True,
        capture_output=True,
    )
    assert done.returncode == 9, done.stderr


def _index_state(path: Path) -> int:
    return int.from_bytes(index.index_path(path).read_bytes()[8:12], "little")


def test_a_killed_run_leaves_a_checkpoint_the_next_run_extends(tmp_path: Path) -> None:
    """A run killed (kill -9) while it extends a clean index leaves it as a checkpoint of
    what it covered: readers without the lock do not trust it (they build their own), and
    the next run reads the ledger on from there, in the same file (no rebuild); both get
    exactly a plain fold of every record, what the killed run wrote included."""
    path = tmp_path / "l.jsonl"
    write_run(path, history("r1", 12))
    assert _index_state(path) == layout.CLEAN
    _killed_run(
        path,
        """
book.append(header("r2"))
book.append(intent("r2", "组00003", 4))
book.append(result("r2", "组00003", 4, Outcome.CREATED))
book.append(intent("r2", "新名字", 99))
""",
    )
    assert _index_state(path) == layout.CHECKPOINT
    want = in_memory(path)
    assert want.latest["组00003"].done and want.latest["新名字"].in_doubt
    same_state(read_state(path), want)
    inode = index.index_path(path).stat().st_ino
    with Ledger.open(path, target=TARGET) as book:
        same_state(book.state, want)
        assert index.index_path(path).stat().st_ino == inode  # extended, not rebuilt
    assert _index_state(path) == layout.CLEAN


_CHECKPOINT_THEN_MORE = """
journal.CHECKPOINT_S = 3600.0  # one checkpoint only: the one asked for below
book.append(header("r2"))
for i in range(5):
    book.append(intent("r2", f"早{i}", 100 + i))
book._next_checkpoint = 0.0
book.append(result("r2", "早0", 100, Outcome.CREATED))  # checkpoints, up to this record
for i in range(5):
    book.append(intent("r2", f"晚{i}", 200 + i))  # after the checkpoint: in the table only
"""


def test_checkpoints_during_a_run_let_the_next_run_read_on(tmp_path: Path) -> None:
    """A run checkpoints its index as it goes. Killed after more records (new Names among
    them, in the table but past the checkpoint), the next run folds the rest in from the
    checkpoint, in the same file, and counts every Name once."""
    path = tmp_path / "l.jsonl"
    write_run(path, history("r1", 12))
    os.unlink(index.index_path(path))  # a rebuilt index: dirty until its first checkpoint
    _killed_run(path, _CHECKPOINT_THEN_MORE)
    assert _index_state(path) == layout.CHECKPOINT
    want = in_memory(path)
    assert want.latest["早0"].done and want.latest["晚4"].in_doubt
    inode = index.index_path(path).stat().st_ino
    with Ledger.open(path, target=TARGET) as book:
        same_state(book.state, want)
        assert index.index_path(path).stat().st_ino == inode
        assert len(book.state.latest) == len(want.latest)  # 晚0-4 counted once


@pytest.mark.parametrize("cut", ["after the checkpoint", "at the checkpoint"])
def test_a_ledger_cut_back_behind_its_checkpoint_index_is_rebuilt(tmp_path: Path, cut: str) -> None:
    """A ledger restored in place from a backup, cut back, or shorter after a power cut
    than what its checkpoint index folded in: the index holds words the ledger no longer
    has, so nobody trusts it; the next run and every reader get the ledger's word."""
    path = tmp_path / "l.jsonl"
    write_run(path, history("r1", 12))
    _killed_run(path, _CHECKPOINT_THEN_MORE)
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    keep = 3 if cut == "after the checkpoint" else 5  # 晚0-1 survive, or none of 晚
    path.write_bytes(b"".join(lines[: len(lines) - keep]))  # in place: same inode
    want = in_memory(path)
    assert "晚4" not in want.latest
    same_state(read_state(path), want)
    with Ledger.open(path, target=TARGET) as book:
        same_state(book.state, want)
        assert "晚4" not in book.state.latest


def test_a_table_grown_after_a_checkpoint_is_dirty_until_the_next(tmp_path: Path) -> None:
    """Growing makes a new file; a checkpoint of the old one describes nothing in it, so a
    run killed before its next checkpoint leaves it dirty, and the next run rebuilds."""
    path = tmp_path / "l.jsonl"
    write_run(path, history("r1", 12))
    n = int(layout.MIN_SLOTS * layout.MAX_LOAD) + 10
    _killed_run(
        path,
        f"""
book.append(header("r2"))
for i in range({n}):
    book.append(intent("r2", f"名{{i}}", i + 1))
""",
    )
    assert _index_state(path) == layout.DIRTY
    want = in_memory(path)
    same_state(read_state(path), want)
    with Ledger.open(path, target=TARGET) as book:
        same_state(book.state, want)


def test_the_table_grows_and_keeps_every_name(tmp_path: Path) -> None:
    """Past its load limit the table doubles into a new file and loses nothing."""
    path = tmp_path / "l.jsonl"
    n = int(layout.MIN_SLOTS * layout.MAX_LOAD) + 50
    records: list[RunHeader | Intent | Result | Footer] = [header("r1")]
    records += [intent("r1", f"名{i}", i + 1) for i in range(n)]
    write_run(path, records)
    got = read_state(path)
    assert isinstance(got.latest, Table) and got.latest.slots == 2 * layout.MIN_SLOTS
    assert len(got.latest) == n and all(f"名{i}" in got.latest for i in range(n))


def test_names_that_share_a_home_slot_stay_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a hash that sends every Name to the same slot, probing still keeps each Name's
    own word (the full 128-bit key decides, never the slot)."""
    real = layout.name_key

    def crowded(name: str) -> bytes:
        return bytes(8) + real(name)[8:]  # the home slot comes from the first 8 bytes

    monkeypatch.setattr(table, "name_key", crowded)
    path = tmp_path / "l.jsonl"
    write_run(path, history("r1", 40))
    same_state(read_state(path), in_memory(path))


# -- the manifest's duplicate-Name check ---------------------------------------------------


@pytest.mark.parametrize("tiny_hash", [lambda name: 7, len], ids=["one hash", "by length"])
def test_colliding_hashes_never_make_a_false_duplicate(tmp_path: Path, tiny_hash: Any) -> None:
    """With a hash under which many Names collide, only a Name really given twice is a
    duplicate, and its problem names both lines; every other line stays a group."""
    from worker.manifest import source, spool

    lines = [
        '{"Name": "A1"}',
        '{"Name": "B2"}',
        "",
        '{"Name": "C33"}',
        '{"Name": "A1"}',
        '{"Name": "bad name"}',
        '{"Name": "B2"}',
        '{"Name": "A1"}',
        '{"Name": "D4"}',
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with source.scan(path, name_hash=tiny_hash) as scanned:
        got = [str(p) for p in scanned.problems]
        items = list(spool.read(scanned))
        assert (scanned.groups, scanned.invalid, scanned.problem_count) == (4, 4, 4)
    assert [g for g in got if "already given" in g] == [
        f"{path}:5: Name: 'A1' is already given on line 1",
        f"{path}:7: Name: 'B2' is already given on line 2",
        f"{path}:8: Name: 'A1' is already given on line 1",
    ]
    assert got[1].startswith(f"{path}:6: Name: ")  # problems stay in line order
    assert [(i.line, i.name, type(i).__name__) for i in items] == [
        (1, "A1", "Group"),
        (2, "B2", "Group"),
        (4, "C33", "Group"),
        (5, "A1", "Invalid"),
        (6, "bad name", "Invalid"),
        (7, "B2", "Invalid"),
        (8, "A1", "Invalid"),
        (9, "D4", "Group"),
    ]


def test_the_duplicate_check_is_the_same_with_the_real_hash(tmp_path: Path) -> None:
    """The default hash gives the same verdicts as a colliding one."""
    from worker.manifest import source, spool

    lines = [f'{{"Name": "N{i % 700}"}}' for i in range(1000)]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    verdicts = []
    for name_hash in (hash, lambda name: hash(name) % 5):
        with source.scan(path, name_hash=name_hash) as scanned:
            verdicts.append(
                [
                    (i.line, type(i).__name__, str(getattr(i, "problem", "")))
                    for i in spool.read(scanned)
                ]
            )
    assert verdicts[0] == verdicts[1]
    assert sum(kind == "Invalid" for _, kind, _ in verdicts[0]) == 300
    assert verdicts[0][700][2].endswith("'N0' is already given on line 1")


# -- the index is a cache: failing to keep it never stops a run ----------------------------

CHILD_PRELUDE = """
import json, os, resource, signal, sys
from pathlib import Path
import structlog
from structlog.testing import capture_logs
from tests.test_scale import TARGET, header, in_memory, intent, result, same_state
from worker.ledger.journal import Ledger
from worker.ledger.load import read_state
from worker.ledger.records import Outcome
path = Path(sys.argv[1])
limit = int(sys.argv[2])
if limit:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
"""

RUN_ON = (
    CHILD_PRELUDE
    + """
with capture_logs() as logs:
    book = Ledger.open(path, target=TARGET)
    book.append(header("r2"))
    book.append(intent("r2", "组00003", 4))
    book.append(result("r2", "组00003", 4, Outcome.CREATED))
    book.append(intent("r2", "新名字", 99))
    where = "memory" if book.state.latest.in_memory else "file"
    book.close()
    same_state(book.state, in_memory(path))
    book.state.close()
print(json.dumps({"where": where, "logs": logs}))
"""
)

READ = (
    CHILD_PRELUDE
    + """
with capture_logs() as logs:
    got = read_state(path)
    same_state(got, in_memory(path))
print(json.dumps({"where": "memory" if got.latest.in_memory else "file", "logs": logs}))
"""
)


def _drop_file_permission_override() -> None:
    """In the child: root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, so a read-only
    folder refuses it as it would refuse a user (the tests run as root)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _child(code: str, path: Path, *, limit: int = 0, read_only: bool = False) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", code, str(path), str(limit)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        timeout=60,
        preexec_fn=_drop_file_permission_override if read_only else None,
    )
    assert out.returncode == 0, out.stderr
    assert "Exception ignored" not in out.stderr and "Traceback" not in out.stderr
    got: dict[str, Any] = orjson.loads(out.stdout.splitlines()[-1])
    return got


def _unavailable(logs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] == "ledger.index_unavailable"]


@pytest.mark.parametrize(
    ("fault", "instead"),
    [
        ("file size limit", "memory"),
        ("read-only folder", f"a private file in {tempfile.gettempdir()}"),
    ],
)
def test_a_run_that_cannot_create_its_index_goes_on_without_it(
    tmp_path: Path, fault: str, instead: str
) -> None:
    """No index can be made beside the ledger (EFBIG everywhere: then in memory; EACCES in a
    read-only folder: then a private file in the temporary folder): the run opens, appends
    and closes, says so once, and leaves no index behind; readers and the next run read the
    ledger's word."""
    folder = tmp_path / "ledgers"
    folder.mkdir()
    path = folder / "l.jsonl"
    write_run(path, history("r1", 30))
    os.unlink(index.index_path(path))
    limit = path.stat().st_size + (64 << 10)  # room for the ledger, not for an index
    if fault == "read-only folder":
        folder.chmod(0o555)
    try:
        got = _child(
            RUN_ON,
            path,
            limit=limit if fault == "file size limit" else 0,
            read_only=fault == "read-only folder",
        )
    finally:
        folder.chmod(0o755)
    assert got["where"] == ("memory" if instead == "memory" else "file")
    (event,) = _unavailable(got["logs"])
    assert event["instead"] == instead and event["log_level"] == "warning"
    reason = "File too large" if fault == "file size limit" else "Permission denied"
    assert event["reason"] == reason
    assert sorted(p.name for p in folder.iterdir()) == ["l.jsonl", "l.jsonl.lock"]
    want = in_memory(path)
    assert want.latest["组00003"].done and want.latest["新名字"].in_doubt
    same_state(read_state(path), want)
    with Ledger.open(path, target=TARGET) as book:
        same_state(book.state, want)
    assert index.index_path(path).read_bytes()[8:12] == b"\1\0\0\0"  # rebuilt, clean


def test_a_run_that_cannot_save_its_index_leaves_it_for_a_rebuild(tmp_path: Path) -> None:
    """An index that can be used but not saved at close (its trailer is past the file size
    limit): the run ends normally, says why, and leaves the index marked dirty, so the next
    reader and run rebuild it rather than trust it."""
    path = tmp_path / "l.jsonl"
    write_run(path, history("r1", 30))
    limit = layout.HEADER_BYTES + layout.MIN_SLOTS * layout.SLOT_BYTES  # no room for a trailer
    got = _child(RUN_ON, path, limit=limit)
    assert got["where"] == "file"
    (event,) = _unavailable(got["logs"])
    assert event["instead"] == "a rebuild by the next run" and event["reason"] == "File too large"
    assert index.index_path(path).read_bytes()[8:12] == b"\0\0\0\0"  # marked dirty
    same_state(read_state(path), in_memory(path))
    with Ledger.open(path, target=TARGET) as book:
        same_state(book.state, in_memory(path))


def test_a_reader_that_cannot_build_a_private_index_reads_in_memory(tmp_path: Path) -> None:
    """A dry run or report on a full disk: no private index file can be made, the state is
    built in memory, the same as a plain fold of every record."""
    path = tmp_path / "l.jsonl"
    write_run(path, history("r1", 30))
    os.unlink(index.index_path(path))
    got = _child(READ, path, limit=path.stat().st_size + (64 << 10))
    assert got["where"] == "memory"
    (event,) = _unavailable(got["logs"])
    assert event["instead"] == "memory" and event["reason"] == "File too large"


@pytest.mark.parametrize("start", ["a clean index", "no index"])
def test_an_index_that_cannot_be_marked_dirty_is_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start: str
) -> None:
    """When the index cannot be marked (dirty, or a checkpoint being extended: EIO), the run
    never changes that index: a
    current one is copied into memory and removed, a new one gives way to a private file;
    either way the run's state is right and the next run trusts only what is true."""
    path = tmp_path / "l.jsonl"
    write_run(path, history("r1", 30))
    if start == "no index":
        os.unlink(index.index_path(path))

    def cannot(table: Table) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with monkeypatch.context() as patch, capture_logs() as logs:
        patch.setattr(index, "mark_dirty", cannot)  # a new index, before its first change
        patch.setattr(index, "mark_checkpoint", cannot)  # a current one, before it is extended
        with Ledger.open(path, target=TARGET) as book:
            table = book.state.latest
            assert isinstance(table, Table) and table.path is None
            book.append(header("r2"))
            book.append(result("r2", "组00004", 5, Outcome.CREATED))
            same_state(book.state, in_memory(path))
    (event,) = _unavailable(logs)
    assert event["reason"] == "Input/output error"
    if start == "a clean index":
        assert table.in_memory and event["instead"] == "memory"
    else:
        assert not table.in_memory and event["instead"] == f"a private file in {tmp_path}"
    assert not index.index_path(path).exists()
    same_state(read_state(path), in_memory(path))


def test_a_table_that_cannot_grow_into_a_file_grows_in_memory(tmp_path: Path) -> None:
    """Past its load limit, with no file to grow into, the table doubles in memory, keeps
    every Name's word and says so once."""
    fd, name = tempfile.mkstemp(dir=tmp_path)
    os.unlink(name)
    table = Table(
        fd,
        slots=layout.MIN_SLOTS,
        used=0,
        codes=[],
        ledger_fd=None,
        writable=True,
        tmp_dir=str(tmp_path / "gone"),  # mkstemp there fails: ENOENT
    )
    n = int(layout.MIN_SLOTS * layout.MAX_LOAD) + 50
    with capture_logs() as logs:
        for i in range(n):
            table.put(Item.of(intent("r1", f"名{i}", i + 1, version=i % 3)), 0)
    assert table.in_memory and table.slots == 2 * layout.MIN_SLOTS and len(table) == n
    assert all(table[f"名{i}"].fingerprint == fp(f"名{i}", i % 3) for i in range(n))
    (event,) = _unavailable(logs)
    assert event["instead"] == "memory" and event["reason"] == "No such file or directory"
    assert repr(table) == f"<Table memory {n}/{2 * layout.MIN_SLOTS}>"
    table.close()
    assert repr(table) == "<Table private file closed>"


def test_a_table_that_cannot_be_built_closes_what_it_was_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A table whose file cannot be allocated (a device: ENODEV) raises OSError, closes both
    descriptors it was given, and its finalizer prints nothing ("Exception ignored")."""
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    fd = os.open("/dev/null", os.O_RDWR)
    ledger_fd = os.open("/dev/null", os.O_RDONLY)
    with pytest.raises(OSError):
        Table(
            fd,
            slots=layout.MIN_SLOTS,
            used=0,
            codes=[],
            ledger_fd=ledger_fd,
            writable=True,
            tmp_dir="/tmp",
        )
    gc.collect()
    for closed in (fd, ledger_fd):
        with pytest.raises(OSError):
            os.fstat(closed)
    assert unraisable == []
