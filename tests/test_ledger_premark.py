"""The manifest's done lines marked by the index's rebuild (worker/ledger/premark.py): exactly
the lines the plan would skip as done, never another; believed only when the ledger ends
where the child stopped reading; and nothing hangs or is wrongly marked when the child
laid out first, dies, or the run gives up on its offer."""

from __future__ import annotations

import mmap
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SandboxProc, cli_env, ledger_records, run_worker
from tests.test_plan_ahead import _setting, done_then_drifted, rerun
from tests.test_scale import TARGET, header, intent
from worker.commands import run
from worker.ledger import index, prebuild, premark
from worker.ledger.journal import Ledger
from worker.ledger.load import read_state
from worker.manifest import spool
from worker.manifest.load import scan_manifest
from worker.manifest.values import Invalid
from worker.plan import run_plan


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    """Marks for a short manifest, and a child that waits for the run to offer them."""
    monkeypatch.setattr(premark, "MIN_LINES", 10)
    monkeypatch.setattr(premark, "PATIENCE_S", 30.0)


def _rebuilt(tmp_path: Path, n: int) -> tuple[Path, Path]:
    """The ahead tests' setting (done, changed, rejected, deferred, in doubt, new, invalid),
    its index gone: the run finds nothing remembered."""
    manifest, ledger = _setting(tmp_path, n)
    os.unlink(index.index_path(ledger))
    return manifest, ledger


def _started(ledger: Path, manifest: Path) -> prebuild.Prebuild:
    child = prebuild.start(ledger, manifest, run.DONE_OUTCOMES)
    assert child is not None and child.board is not None
    return child


def _done(ledger: Path, manifest: Path) -> list[int]:
    """The items decide_on says are done, with the ledger as it is now."""
    state = read_state(ledger)
    try:
        with scan_manifest(manifest, ledger) as scan:
            return [
                k
                for k, item in enumerate(spool.read_lazily(scan))
                if not isinstance(item, Invalid)
                and run_plan.decide_on(state.latest.get(item.name), item.fingerprint)
                is run_plan.DONE_DECISION
            ]
    finally:
        state.close()


def _marked(child: prebuild.Prebuild) -> list[int]:
    marks = child.marks()
    assert marks is not None
    return [k for k in range(len(marks)) if marks[k]]


def test_the_child_marks_exactly_the_lines_the_plan_skips_as_done(
    tmp_path: Path, small: None
) -> None:
    manifest, ledger = _rebuilt(tmp_path, 600)
    child = _started(ledger, manifest)
    try:
        with scan_manifest(manifest, ledger) as scan:
            child.offer(run._offered(scan))
        fd = child.take()
        assert fd is not None
        os.close(fd)
        done = _done(ledger, manifest)
        assert len(done) > 50  # done as they are; not the changed, rejected, in doubt, ...
        assert _marked(child) == done
    finally:
        child.close()
    assert child.marks() is None


def test_marks_are_not_believed_when_the_ledger_grew_after_the_child_read_it(
    tmp_path: Path, small: None
) -> None:
    """Another run appended (a Name done before is now in doubt): the child's marks may
    say what is no longer true, so the run plans without them."""
    manifest, ledger = _rebuilt(tmp_path, 200)
    child = _started(ledger, manifest)
    try:
        with scan_manifest(manifest, ledger) as scan:
            child.offer(run._offered(scan))
            first = next(i for i in spool.read_lazily(scan) if not isinstance(i, Invalid))
        # The child is done (not reaped: `take` does that) before the other run appends.
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        with Ledger.open(ledger, target=TARGET) as other:
            other.append(header("r2"))
            other.append(intent("r2", first.name, 2))
        fd = child.take()
        assert fd is not None  # an index of the prefix it read, which a run reads on from
        os.close(fd)
        assert child.board is not None and child.board.marks[1] == 1  # the line, marked
        assert child.marks() is None  # yet not believed
    finally:
        child.close()


def test_a_child_that_laid_out_first_marks_nothing_and_the_offer_is_not_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child does not wait for a run still validating: it builds the index alone, and
    the run, told so, does not hash its manifest for nothing."""
    monkeypatch.setattr(premark, "MIN_LINES", 10)
    manifest, ledger = _rebuilt(tmp_path, 200)
    child = _started(ledger, manifest)
    try:
        status = os.waitpid(child.pid, 0)[1]
        child.pid = 0
        assert os.waitstatus_to_exitcode(status) == 0
        offered: list[int] = []

        def entries() -> Iterator[tuple[int, str, str]]:
            offered.append(1)
            yield 0, "N1", "0" * 64

        assert child.board is not None
        assert not premark.offer(child.board, entries())
        assert offered == []
        assert not any(child.board.marks[:])
    finally:
        child.close()


def test_a_run_that_gives_up_its_offer_leaves_the_child_to_build_alone(
    tmp_path: Path, small: None
) -> None:
    """The spool fails mid-offer: the child, waiting, reads the pipe's end and builds the
    index without marks; the run's error is its own."""
    manifest, ledger = _rebuilt(tmp_path, 200)
    child = _started(ledger, manifest)

    def entries() -> Iterator[tuple[int, str, str]]:
        yield 0, "N1", "0" * 64
        raise OSError("the spool went away")

    try:
        child.offer(entries())
        fd = child.take()
        assert fd is not None
        os.close(fd)
        assert _marked(child) == []
    finally:
        child.close()


def test_a_child_that_dies_leaves_no_marks_and_the_offer_does_not_hang(
    tmp_path: Path, small: None
) -> None:
    manifest, ledger = _rebuilt(tmp_path, 200)
    child = _started(ledger, manifest)
    try:
        os.kill(child.pid, signal.SIGKILL)
        os.waitpid(child.pid, 0)
        child.pid = 0
        with scan_manifest(manifest, ledger) as scan:
            assert child.board is not None
            assert not premark.offer(child.board, run._offered(scan))  # its pipe is broken
        assert child.take() is None
        assert child.marks() is None
    finally:
        child.close()


def test_no_board_for_a_short_manifest_or_without_fork_or_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, ledger = _rebuilt(tmp_path, 60)
    child = prebuild.start(ledger, manifest, run.DONE_OUTCOMES)  # 61 < MIN_LINES
    assert child is not None and child.board is None and child.marks() is None
    child.close()
    monkeypatch.setattr(premark, "MIN_LINES", 10)
    fds = set(os.listdir("/proc/self/fd"))

    def no_fork() -> int:
        raise OSError("no fork")

    monkeypatch.setattr(os, "fork", no_fork)
    assert prebuild.start(ledger, manifest, run.DONE_OUTCOMES) is None
    assert set(os.listdir("/proc/self/fd")) == fds  # the board's scratch file and pipe closed
    monkeypatch.undo()
    monkeypatch.setattr(premark, "MIN_LINES", 10)

    class NoMemory:
        def __init__(self, *args: object) -> None:
            raise OSError("no memory")

    monkeypatch.setattr(mmap, "mmap", NoMemory)
    child = prebuild.start(ledger, manifest, run.DONE_OUTCOMES)  # a child, with no board
    assert child is not None and child.board is None
    child.close()
    assert set(os.listdir("/proc/self/fd")) == fds


@pytest.mark.slow
def test_a_rerun_with_marks_counts_and_sends_what_one_without_does(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """The real CLI, nothing remembered: a rerun over lines done, changed, new and invalid
    sends the same Names and records the same counts with the rebuild's marks as without;
    a rerun of lines all done, marked all, sends nothing and counts them all done."""
    sandbox: SandboxProc = sandbox_factory("--rate", "1000")
    env = {**cli_env(tmp_path), "TESTHOOK_PREMARK_PATIENCE_S": "30"}
    opts = ("--endpoint", sandbox.url, "--rate", "1000", "-q")
    _, first, ledger, manifest = done_then_drifted(sandbox, tmp_path, env, opts)
    footers = []
    for min_lines in ("1", "1000000"):
        folder = tmp_path / f"min{min_lines}"
        folder.mkdir()
        copy = folder / "l.jsonl"
        shutil.copyfile(ledger, copy)  # no index beside it: rebuilt
        footer = rerun(
            sandbox, manifest, copy, opts, {**env, "TESTHOOK_PREMARK_MIN_LINES": min_lines}
        )
        footers.append(footer["skipped"])
    assert footers[0] == footers[1] == {"done": 180, "done_changed": 20}
    again = tmp_path / "again"
    again.mkdir()
    shutil.copyfile(ledger, again / "l.jsonl")
    before = len(sandbox.creates())
    out = run_worker(
        "run", str(first), "--ledger", str(again / "l.jsonl"), *opts,
        env={**env, "TESTHOOK_PREMARK_MIN_LINES": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert len(sandbox.creates()) == before
    assert ledger_records(again / "l.jsonl")[-1]["skipped"] == {"done": 200}
