"""The ledger's index rebuilt by a second process while the manifest is validated
(worker/ledger/prebuild.py): taken only as an index found on disk would be, read on past
what the child saw, and never leaving anything behind when it is not taken."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.test_scale import TARGET, header, history, in_memory, intent, result, same_state
from worker.errors import LedgerError
from worker.ledger import index, layout, prebuild
from worker.ledger.journal import Ledger
from worker.ledger.prebuild import Prebuild
from worker.ledger.records import Outcome
from worker.ledger.table import Table


def write_ledger(path: Path, n: int) -> None:
    """A ledger of `n` Names as an older worker left it: no index beside it."""
    with Ledger.open(path, target=TARGET) as book:
        for record in history("r1", n):
            book.append(record)
    os.unlink(index.index_path(path))


def started(path: Path) -> Prebuild:
    got = prebuild.start(path, path.with_name("m.jsonl"))
    assert got is not None, f"no prebuild; threads: {threading.enumerate()}"
    return got


class Taken:
    """A prebuild already waited for: `take` gives its file (records were appended to the
    ledger after the child had read it)."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def take(self) -> int | None:
        fd, self.fd = self.fd, None
        return fd

    def cancel(self) -> None:
        if self.fd is not None:
            os.close(self.fd)


def salt_of(fd: int, path: Path) -> bytes:
    """The salt of the index in `fd`, which describes the ledger at `path`: a table's own."""
    ledger_fd = os.open(path, os.O_RDONLY)
    try:
        return index.read_index(fd, ledger_fd)[4]
    finally:
        os.close(ledger_fd)


def test_a_run_names_the_childs_index_and_reads_it_like_any(tmp_path: Path) -> None:
    """The child's index becomes the ledger's index (the very table: its salt is drawn per
    table), and the run's state is the plain fold of every record; the index is clean once
    the run closes."""
    path = tmp_path / "l.jsonl"
    write_ledger(path, 60)
    child = started(path)
    fd = child.take()
    assert fd is not None and child.pid == 0 and child.fd == -1
    salt = salt_of(fd, path)
    with Ledger.open(path, target=TARGET, prebuilt=Taken(fd)) as book:
        assert isinstance(book.state.latest, Table) and book.state.latest.salt == salt
        same_state(book.state, in_memory(path))
    assert index.index_path(path).read_bytes()[8:12] == b"\1\0\0\0"  # clean
    kept = os.open(index.index_path(path), os.O_RDONLY)
    try:
        assert salt_of(kept, path) == salt
    finally:
        os.close(kept)


def test_records_appended_after_the_child_read_the_ledger_are_read_on(tmp_path: Path) -> None:
    """Another run appended to the ledger after the child had read it: the run takes the
    child's index for the prefix it covers and folds in the rest."""
    path = tmp_path / "l.jsonl"
    write_ledger(path, 40)
    fd = started(path).take()
    assert fd is not None
    with Ledger.open(path, target=TARGET) as other:  # appends, and leaves its own index
        other.append(header("r2"))
        other.append(intent("r2", "后来", 41))
        other.append(result("r2", "组00003", 4, Outcome.DELETED))
    os.unlink(index.index_path(path))
    salt = salt_of(fd, path)
    with Ledger.open(path, target=TARGET, prebuilt=Taken(fd)) as book:
        assert isinstance(book.state.latest, Table) and book.state.latest.salt == salt
        same_state(book.state, in_memory(path))
        assert book.state.latest["组00003"].outcome is Outcome.DELETED
        assert book.state.latest["后来"].in_doubt


def test_an_index_that_is_current_needs_no_child(tmp_path: Path) -> None:
    """A ledger whose index a run can use, an empty ledger, none at all: nothing started."""
    path = tmp_path / "l.jsonl"
    write_ledger(path, 10)
    with Ledger.open(path, target=TARGET):
        pass  # leaves a clean index
    assert prebuild.start(path, tmp_path / "m.jsonl") is None
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert prebuild.start(tmp_path / "empty.jsonl", tmp_path / "m.jsonl") is None
    assert prebuild.start(tmp_path / "none.jsonl", tmp_path / "m.jsonl") is None


@pytest.mark.parametrize("damage", ["a line that is not JSON", "a field of the wrong type"])
def test_a_child_that_finds_damage_leaves_the_error_to_the_run(tmp_path: Path, damage: str) -> None:
    """The child fails silently; the run rebuilds the index itself and names the line, as
    it always did; no index is left."""
    path = tmp_path / "l.jsonl"
    write_ledger(path, 20)
    bad = b"GARBAGE\n" if damage == "a line that is not JSON" else b'{"type":"intent"}\n'
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:5]) + bad + b"".join(lines[5:]))
    child = started(path)
    with pytest.raises(LedgerError, match=r"l.jsonl:6: damaged ledger record"):
        Ledger.open(path, target=TARGET, prebuilt=child)
    assert child.pid == 0 and child.fd == -1


def test_a_file_that_is_not_a_ledger_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    """A --ledger that names another file: the child gives up, the run refuses the file as
    it always did, and nothing is created beside it."""
    path = tmp_path / "notes.txt"
    path.write_bytes(b"some notes\n" * 1000)
    child = started(path)
    with pytest.raises(LedgerError, match="is not a worker ledger"):
        Ledger.open(path, target=TARGET, prebuilt=child)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_prebuild_not_taken_is_stopped_and_leaves_nothing(tmp_path: Path) -> None:
    """`started` cancels what was not taken (a manifest with errors, an interrupt): the
    child is gone, its file with it."""
    path = tmp_path / "l.jsonl"
    write_ledger(path, 2000)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(KeyboardInterrupt), prebuild.started(path, tmp_path / "m.jsonl") as child:
        assert child is not None
        pid = child.pid
        raise KeyboardInterrupt
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_child_whose_parent_was_killed_stops_on_its_own(tmp_path: Path) -> None:
    """The parent killed with -9 while the child builds: the child notices and exits, and
    leaves nothing behind (its file never had a name)."""
    path = tmp_path / "l.jsonl"
    write_ledger(path, 20000)
    before = sorted(p.name for p in tmp_path.iterdir())
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from worker.ledger import prebuild\n"
        "child = prebuild.start(Path(sys.argv[1]), Path('m.jsonl'))\n"
        "print(child.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        timeout=60,
    )
    assert out.returncode == -signal.SIGKILL, out.stderr
    pid = int(out.stdout)
    deadline = time.monotonic() + 30
    while _alive(pid):
        assert time.monotonic() < deadline, "the orphaned child is still running"
        time.sleep(0.05)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, or a pid reused by another process, does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_the_childs_table_is_sized_for_the_manifest(tmp_path: Path) -> None:
    """A manifest of more lines than the ledger has Names: the child's table has room for
    them all (the run would otherwise grow it), as the run's own rebuild would size it."""
    path = tmp_path / "l.jsonl"
    write_ledger(path, 10)
    (tmp_path / "m.jsonl").write_bytes(b"{}\n" * 5000)
    child = started(path)
    with Ledger.open(path, target=TARGET, prebuilt=child, expect_names=5000) as book:
        assert isinstance(book.state.latest, Table)
        assert book.state.latest.slots == layout.slots_for(5001)
