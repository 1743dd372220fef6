"""The lock belongs to the ledger file, and a derived file is checked before it is trusted:
real second processes against a run that holds the ledger, and index slots edited or
copied from another ledger's index, through the real CLI against the sandbox."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AK, cli_env, names, run_worker, worker_cmd, write_manifest
from tests.test_ledger import footer, header, intent, line, result
from tests.test_report import groups_of
from worker.api import spec
from worker.errors import Exit
from worker.ledger import index, layout
from worker.ledger.lock import probe_lock
from worker.ledger.records import Outcome, Target

pytestmark = pytest.mark.slow  # real processes


def start_long_run(tmp: Path, sb: Any, manifest: Path, ledger: Path) -> subprocess.Popen[str]:
    """A `run` that holds `ledger` for a long time (2 req/s over 60 lines), started and
    waited for until it holds the lock (an event, not a sleep)."""
    proc = subprocess.Popen(
        worker_cmd(
            "run",
            str(manifest),
            "--endpoint",
            sb.url,
            "--ledger",
            str(ledger),
            "--rate",
            "2",
            "--grace",
            "1",
        ),
        env=cli_env(tmp),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while probe_lock(ledger) is not True:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the first run never took the lock"
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == Exit.INTERRUPTED, err  # resumable


@pytest.mark.parametrize("how", ["rename", "hard link"])
def test_another_path_to_a_ledger_in_use_is_locked(
    tmp_path: Path, sandbox_factory: Any, how: str
) -> None:
    """While a run uses the ledger, a second run given the name it was renamed to, or a
    hard link to it, exits 5 (locked) and writes nothing; `report` on that path says
    running. After the first ends, the next run on either path finishes the work (exit 0,
    every group created once) and the ledger is never refused."""
    sb = sandbox_factory("--rate", "50")
    manifest = write_manifest(tmp_path / "m.jsonl", names(60))
    ledger = tmp_path / "m.ledger.jsonl"
    other = tmp_path / "other.ledger.jsonl"
    first = start_long_run(tmp_path, sb, manifest, ledger)
    try:
        if how == "rename":
            ledger.rename(other)
        else:
            os.link(ledger, other)
        size = other.stat().st_size
        common = ("--endpoint", sb.url, "--rate", "50")
        second = run_worker(
            "run", str(manifest), "--ledger", str(other), *common, env=cli_env(tmp_path)
        )
        assert second.returncode == Exit.LOCKED, second.stderr
        assert "another run is using" in second.stderr and "Traceback" not in second.stderr
        assert "hard link" in second.stderr
        assert probe_lock(other) is True
        assert other.stat().st_size >= size  # only the first run wrote (it goes on)
    finally:
        stop(first)
    paths = [other] if how == "rename" else [other, ledger]
    for path in paths:
        done = run_worker(
            "run", str(manifest), "--ledger", str(path), *common, env=cli_env(tmp_path)
        )
        assert done.returncode == 0, done.stderr
    created = [c["name"] for c in sb.creates() if c["status"] == 200]
    assert sorted(created) == sorted(r["Name"] for r in names(60))  # each exactly once
    assert probe_lock(other) is False


def _ledger_with(tmp: Path, sb: Any, manifest: Path, outcome: Outcome, folder: str) -> Path:
    """A ledger in tmp/folder where line X's latest word is `outcome`, and its index,
    made by a real `run` of a manifest holding only Y (it folds the ledger into the shared
    index and leaves it clean)."""
    where = tmp / folder
    where.mkdir()
    target = Target(endpoint=sb.url, region=spec.DEFAULT_REGION, access_key=AK)
    x = groups_of(manifest)["X"]
    ledger = where / "l.jsonl"
    ledger.write_bytes(
        b"".join(
            line(r)
            for r in (
                header("r0", target=target),
                intent("X", x.fingerprint, x.line),
                result("X", outcome, x.fingerprint, x.line),
                footer("r0"),
            )
        )
    )
    only_y = write_manifest(where / "y.jsonl", [names(1, "Y")[0]])
    made = run_worker(
        "run", str(only_y), "--endpoint", sb.url, "--ledger", str(ledger), env=cli_env(tmp)
    )
    assert made.returncode == 0, made.stderr
    assert index.index_path(ledger).read_bytes()[8:12] == b"\1\0\0\0"  # clean: trusted
    return ledger


def _slot_of(ipath: Path, name: str) -> int:
    """The byte offset of `name`'s slot in the index file."""
    data = ipath.read_bytes()
    key = layout.name_key(name)
    at = data.find(key, layout.HEADER_BYTES)
    while at >= 0 and (at - layout.HEADER_BYTES) % layout.SLOT_BYTES:
        at = data.find(key, at + 1)
    assert at >= 0, name
    return at


OUTCOME_AT = 16 + 32 + 8 + 8  # key, fingerprint, line, offset


@pytest.mark.parametrize("tamper", ["flip the outcome byte", "copy another ledger's slot"])
def test_an_index_slot_that_fails_its_check_is_never_taken_as_done(
    tmp_path: Path, sandbox_factory: Any, tamper: str
) -> None:
    """X was deferred. Its index slot is edited to say created, or replaced by X's slot
    from another ledger's index where X was created: the next run sends X anyway, and
    exits 0 only with X in the account."""
    sb = sandbox_factory("--rate", "50")
    manifest = write_manifest(tmp_path / "m.jsonl", [{"Name": "X", "ProjectName": "default"}])
    ledger = _ledger_with(tmp_path, sb, manifest, Outcome.DEFERRED, "a")
    ipath = index.index_path(ledger)
    at = _slot_of(ipath, "X")
    data = bytearray(ipath.read_bytes())
    outcomes = (None, *Outcome)
    assert data[at + OUTCOME_AT] == outcomes.index(Outcome.DEFERRED)
    if tamper == "flip the outcome byte":
        data[at + OUTCOME_AT] = outcomes.index(Outcome.CREATED)
    else:
        donor = _ledger_with(tmp_path, sb, manifest, Outcome.CREATED, "b")
        dpath = index.index_path(donor)
        slot = dpath.read_bytes()[(d := _slot_of(dpath, "X")) : d + layout.SLOT_BYTES]
        assert slot[OUTCOME_AT] == outcomes.index(Outcome.CREATED)
        data[at : at + layout.SLOT_BYTES] = slot
    ipath.write_bytes(bytes(data))
    assert "X" not in sb.groups()
    ran = run_worker(
        "run", str(manifest), "--endpoint", sb.url, "--ledger", str(ledger), env=cli_env(tmp_path)
    )
    assert ran.returncode == 0, ran.stderr
    assert "ledger.index_rebuilt" in ran.stderr
    assert sb.groups()["X"]["Status"] == 0
    assert [c["name"] for c in sb.creates() if c["name"] == "X"] == ["X"]
