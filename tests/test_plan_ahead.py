"""The plan looked ahead by a helper process (plan/ahead.py): it marks exactly the lines the
plan would skip as done, never another; it is not started where it cannot help or could
hang; it is stopped and reaped however the plan ends."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SandboxProc, cli_env, ledger_records, names, run_worker, write_manifest
from tests.test_scale import TARGET, header
from worker.ledger.journal import Ledger
from worker.ledger.load import read_state
from worker.ledger.records import Action, Intent, Outcome, Result
from worker.manifest import spool
from worker.manifest.load import scan_manifest
from worker.manifest.values import Invalid
from worker.plan import ahead, run_plan


def _line(i: int, tag: str = "a") -> bytes:
    return (
        f'{{"Name":"N{i}","ProjectName":"default","Tags":[{{"Key":"k","Value":"{tag}",'
        f'"Category":"Custom"}}]}}'
    ).encode()


def _setting(tmp_path: Path, n: int) -> tuple[Path, Path]:
    """A manifest of `n` lines (every 17th invalid) and a ledger whose latest word on them
    is, by turns: done as the line is, done with another body, rejected, deferred, in
    doubt, nothing at all."""
    manifest, ledger = tmp_path / "m.jsonl", tmp_path / "m.ledger.jsonl"
    manifest.write_bytes(
        b"\n".join(b'{"Name": 7}' if i % 17 == 0 else _line(i) for i in range(n)) + b"\n"
    )
    with scan_manifest(manifest, ledger) as scan:
        fps = {
            item.name: item.fingerprint
            for item in spool.read_lazily(scan)
            if not isinstance(item, Invalid)
        }
    other = "f" * 64
    with Ledger.open(ledger, target=TARGET) as book:
        book.append(header("r1"))
        for i, (name, fp) in enumerate(fps.items()):
            kind = i % 6
            if kind == 5:
                continue  # never sent: new
            sent = fp if kind != 1 else other
            book.append(
                Intent(
                    run_id="r1",
                    action=Action.CREATE,
                    name=name,
                    line=i + 1,
                    fingerprint=sent,
                    attempt=1,
                    at="t",
                    body={"Name": name},
                )
            )
            if kind == 4:
                continue  # in doubt
            outcome = (Outcome.CREATED, Outcome.CREATED, Outcome.REJECTED, Outcome.DEFERRED)[kind]
            book.append(
                Result(
                    run_id="r1",
                    action=Action.CREATE,
                    name=name,
                    outcome=outcome,
                    status=200,
                    code="",
                    message="",
                    request_id="",
                    sends=1,
                    fingerprint=sent,
                    line=i + 1,
                    started="t",
                    finished="t",
                )
            )
    return manifest, ledger


def _finished(helper: ahead.Ahead) -> int:
    """Wait for the helper to end on its own: its exit code."""
    _, status = os.waitpid(helper.pid, 0)
    helper.pid = 0
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("retry_rejected", [False, True])
def test_the_helper_marks_exactly_the_lines_the_plan_skips_as_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, retry_rejected: bool
) -> None:
    """Of its blocks (every other one), and of no other."""
    monkeypatch.setattr(ahead, "MIN_LINES", 10)
    monkeypatch.setattr(ahead, "BLOCK", 16)
    manifest, ledger = _setting(tmp_path, 600)
    state = read_state(ledger)
    try:
        with scan_manifest(manifest, ledger) as scan:
            helper = ahead.start(scan, state.latest, retry_rejected)
            assert helper is not None
            assert _finished(helper) == 0
            items = list(spool.read_lazily(scan))
            assert len(helper.marks) == len(items)
            marked = [k for k in range(len(items)) if helper.marks[k]]
            done = [
                k
                for k, item in enumerate(items)
                if ahead.helps(k)
                and not isinstance(item, Invalid)
                and run_plan.decide_on(
                    state.latest.get(item.name), item.fingerprint, retry_rejected=retry_rejected
                )
                is run_plan.DONE_DECISION
            ]
            assert marked == done
            assert len(done) > 30  # the setting has done lines in the helper's blocks
            assert {k // 16 % 2 for k in done} == {1}
            helper.cancel()
    finally:
        state.close()


def test_no_helper_for_a_short_manifest_or_a_table_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, ledger = _setting(tmp_path, 60)
    state = read_state(ledger)
    try:
        with scan_manifest(manifest, ledger) as scan:
            assert ahead.start(scan, state.latest, False) is None  # 60 < MIN_LINES
            monkeypatch.setattr(ahead, "MIN_LINES", 10)
            assert ahead.start(scan, {}, False) is None  # not an index table
            state.latest.to_memory()  # type: ignore[union-attr]
            assert ahead.start(scan, state.latest, False) is None
    finally:
        state.close()


def test_no_helper_while_another_thread_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forked child could find a lock another thread holds, held forever."""
    monkeypatch.setattr(ahead, "MIN_LINES", 10)
    manifest, ledger = _setting(tmp_path, 60)
    state = read_state(ledger)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        with scan_manifest(manifest, ledger) as scan:
            assert ahead.start(scan, state.latest, False) is None
    finally:
        stop.set()
        other.join()
        state.close()


def test_a_plan_that_ends_first_stops_and_reaps_the_helper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ahead, "MIN_LINES", 10)
    manifest, ledger = _setting(tmp_path, 300)
    state = read_state(ledger)
    try:
        with (
            scan_manifest(manifest, ledger) as scan,
            ahead.looked_ahead(scan, state.latest, False) as helper,
        ):
            assert helper is not None
            pid = helper.pid
        assert helper.pid == 0
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaped: no zombie left
        helper.cancel()  # idempotent
    finally:
        state.close()


@pytest.mark.slow
def test_a_rerun_looked_ahead_counts_and_sends_what_one_without_does(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """The real CLI: a rerun over lines done, changed, new and invalid sends the same
    Names and records the same counts with the helper as without."""
    sandbox: SandboxProc = sandbox_factory("--rate", "1000")
    env = cli_env(tmp_path)
    run = ("--endpoint", sandbox.url, "--rate", "1000", "-q")
    _, _, ledger, manifest = done_then_drifted(sandbox, tmp_path, env, run)
    footers = []
    for min_lines in ("1", "1000000"):
        copy = tmp_path / f"l{min_lines}.jsonl"
        shutil.copyfile(ledger, copy)
        footer = rerun(
            sandbox, manifest, copy, run,
            {**env, "TESTHOOK_AHEAD_MIN_LINES": min_lines, "TESTHOOK_AHEAD_BLOCK": "8"},
        )  # fmt: skip
        assert sum(footer["outcomes"].values()) == 101  # the new lines (created, or exists
        footers.append(footer["skipped"])  # the second time: one sandbox) and the invalid one
    assert footers[0] == footers[1] == {"done": 180, "done_changed": 20}


def done_then_drifted(
    sandbox: SandboxProc, tmp: Path, env: dict[str, str], opts: tuple[str, ...]
) -> tuple[list[dict[str, Any]], Path, Path, Path]:
    """A ledger with 200 of 300 groups done (20 of them changed since) and a manifest of all
    300 and an invalid line: (the groups, the first manifest, the ledger, the manifest)."""
    groups = names(300)
    first = write_manifest(tmp / "first.jsonl", groups[:200])
    ledger = tmp / "l.jsonl"
    assert run_worker("run", str(first), "--ledger", str(ledger), *opts, env=env).returncode == 0
    for g in groups[150:170]:  # done with another body: drift
        g["Tags"] = [{"Key": "批次", "Value": "changed", "Category": "Custom"}]
    manifest = write_manifest(tmp / "m.jsonl", [*groups, {"Name": "bad-name"}])
    return groups, first, ledger, manifest


def rerun(
    sandbox: SandboxProc, manifest: Path, ledger: Path, opts: tuple[str, ...], env: dict[str, str]
) -> dict[str, Any]:
    """`run --skip-invalid` of `done_then_drifted`'s manifest over a copy of its ledger: it
    sends the 100 new lines only and exits 1 (the invalid line outranks the drift, 6).
    Returns the run's footer."""
    before = len(sandbox.creates())
    out = run_worker(
        "run", str(manifest), "--ledger", str(ledger), "--skip-invalid", *opts, env=env
    )
    assert out.returncode == 1, out.stderr
    sent = {c["name"] for c in sandbox.creates()[before:]}
    assert sent == {g["Name"] for g in names(300)[200:]}  # the new lines, nothing done
    footer = ledger_records(ledger)[-1]
    assert footer["type"] == "end"
    return footer
