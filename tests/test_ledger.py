"""The ledger: typed records, reload, torn tails, damage, foreign files, targets, locking;
and the plan built on it."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest

from worker.errors import (
    Exit,
    LedgerError,
    LedgerLocked,
    LedgerTargetMismatch,
    LedgerWriteError,
    Problem,
)
from worker.ledger import index, layout
from worker.ledger.file import MAX_RECORD_BYTES
from worker.ledger.journal import Ledger, default_path
from worker.ledger.load import read_state
from worker.ledger.lock import Holder, lock_path, probe_lock
from worker.ledger.records import (
    Action,
    Footer,
    Intent,
    Latest,
    Outcome,
    Result,
    RunHeader,
    StopReason,
    Target,
)
from worker.ledger.schema import parse
from worker.ledger.state import State
from worker.manifest.values import Group, Invalid
from worker.plan import run_plan

TARGET = Target(endpoint="http://127.0.0.1:8080", region="cn-north-1", access_key="AKTEST")
OTHER = Target(endpoint="https://live.volcengineapi.com", region="cn-north-1", access_key="AKTEST")
F1, F2 = "1" * 64, "2" * 64


def header(run_id: str = "r1", target: Target = TARGET, **over: Any) -> RunHeader:
    values: dict[str, Any] = dict(
        run_id=run_id,
        started="2024-01-01T00:00:00.000Z",
        version="0.2.0",
        command="run",
        target=target,
        manifest="/m.jsonl",
        manifest_sha256="a" * 64,
        items=3,
        plan={"new": 3},
        settings={"rate": 10.0},
    )
    values.update(over)
    return RunHeader(**values)


def intent(name: str, fingerprint: str = F1, line: int = 1) -> Intent:
    return Intent(
        run_id="r1",
        action=Action.CREATE,
        name=name,
        line=line,
        fingerprint=fingerprint,
        attempt=1,
        at="t",
        body={"Name": name},
    )


def result(
    name: str | None, outcome: Outcome, fingerprint: str | None = F1, line: int = 1, code: str = ""
) -> Result:
    return Result(
        run_id="r1",
        action=None if outcome is Outcome.INVALID else Action.CREATE,
        name=name,
        outcome=outcome,
        status=None,
        code=code,
        message="",
        request_id="",
        sends=1,
        fingerprint=fingerprint,
        line=line,
        started="t",
        finished="t",
    )


def footer(run_id: str = "r1", stopped_by: StopReason | None = None) -> Footer:
    return Footer(
        run_id=run_id,
        finished="t",
        stopped_by=stopped_by,
        exit_code=0,
        outcomes={},
        skipped={},
        codes={},
        requests=0,
        throttles=0,
        retries=0,
        duration_s=1.0,
        rate_limit=10.0,
        rate_achieved=0.0,
    )


def line(record: Any) -> bytes:
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


def write(path: Path, *records: Any, tail: bytes = b"") -> bytes:
    data = b"".join(line(r) for r in records) + tail
    path.write_bytes(data)
    return data


def test_default_path_is_beside_the_manifest() -> None:
    """groups.jsonl -> groups.ledger.jsonl in the same folder."""
    assert default_path(Path("/x/groups.jsonl")) == Path("/x/groups.ledger.jsonl")
    assert default_path(Path("list.txt")) == Path("list.txt.ledger.jsonl")


def test_typed_records_round_trip_through_the_file(tmp_path: Path) -> None:
    """What a run appends as typed records, the next open reads back as equal records."""
    path = tmp_path / "l.jsonl"
    written: list[RunHeader | Intent | Result | Footer] = [
        header(),
        intent("A"),
        result("A", Outcome.CREATED),
        footer(),
    ]
    with Ledger.open(path, target=TARGET) as book:
        for record in written:
            book.append(record)
    assert [
        parse(orjson.loads(raw), where="x") for raw in path.read_bytes().splitlines()
    ] == written


def test_append_and_reload_keep_the_latest_word_per_name(tmp_path: Path) -> None:
    """Reopening gives the latest result per Name, in-doubt intents, runs and footers."""
    path = tmp_path / "l.jsonl"
    with Ledger.open(path, target=TARGET) as book:
        for record in (
            header(),
            intent("A"),
            result("A", Outcome.DEFERRED, code="CommonErr"),
            intent("A"),
            result("A", Outcome.CREATED),
            intent("B", F2),
            footer(),
        ):
            book.append(record)
    with Ledger.open(path, target=TARGET) as book:
        state = book.state
    a, b = state.latest["A"], state.latest["B"]
    assert (a.outcome, a.done, a.in_doubt, a.fingerprint, a.code) == (
        Outcome.CREATED,
        True,
        False,
        F1,
        "",
    )
    assert (b.outcome, b.in_doubt, b.fingerprint) == (None, True, F2)
    assert [h.run_id for h in state.runs] == ["r1"] and state.footer == footer()
    assert state.target == TARGET


def test_close_is_idempotent_and_a_closed_ledger_refuses_writes(tmp_path: Path) -> None:
    """close() twice is fine; an append after close raises LedgerWriteError, not EBADF."""
    book = Ledger.open(tmp_path / "l.jsonl", target=TARGET)
    book.close()
    book.close()
    with pytest.raises(LedgerWriteError, match="closed"):
        book.append(header())
    assert "closed" in repr(book)


def test_torn_tail_is_cut_off_and_readers_skip_it(tmp_path: Path) -> None:
    """A last line without its newline (a crash mid-write) is cut when the ledger opens;
    readers skip it without changing the file."""
    path = tmp_path / "l.jsonl"
    whole = write(path, header(), result("A", Outcome.CREATED))
    path.write_bytes(whole + b'{"type":"result","name":"\xe4\xb8')
    state = read_state(path)
    assert "A" in state.latest and state.torn_tail
    assert path.read_bytes().endswith(b"\xe4\xb8")
    with Ledger.open(path, target=TARGET) as book:
        assert book.state.torn_tail
    assert path.read_bytes() == whole


def test_a_lone_torn_header_of_ours_is_cut(tmp_path: Path) -> None:
    """A run killed while writing its header leaves a prefix of it: that is ours to cut."""
    path = tmp_path / "l.jsonl"
    path.write_bytes(line(header())[:40])
    with Ledger.open(path, target=TARGET) as book:
        assert book.state.runs == []
    assert path.read_bytes() == b""


def test_damage_in_the_middle_names_the_line_and_changes_nothing(tmp_path: Path) -> None:
    """A broken record that is not the torn tail is an error; the torn tail after it stays."""
    path = tmp_path / "l.jsonl"
    data = write(
        path, header(), tail=b"GARBAGE\n" + line(result("B", Outcome.CREATED)) + b'{"type":'
    )
    with pytest.raises(LedgerError, match=r"l.jsonl:2: damaged ledger record: the line is not "):
        Ledger.open(path, target=TARGET)
    with pytest.raises(LedgerError, match=r":2: damaged"):
        read_state(path)
    assert path.read_bytes() == data


@pytest.mark.parametrize(
    ("edit", "field", "said"),
    [
        ({"outcome": "made"}, "outcome", "must be one of created"),
        ({"status": "200"}, "status", "must be an integer"),
        ({"line": -4}, "line", "must not be negative"),
        ({"fingerprint": "xyz"}, "fingerprint", "must be a sha256"),
        ({"name": 7}, "name", "must be a string"),
        ({"code": None}, "code", "must be a string, not null"),
    ],
)
def test_wrong_types_name_file_line_and_field(
    tmp_path: Path, edit: dict[str, Any], field: str, said: str
) -> None:
    """A hand-edited record with valid JSON but a wrong type names FILE:LINE and the field."""
    path = tmp_path / "l.jsonl"
    bad = orjson.loads(line(result("A", Outcome.CREATED))) | edit
    write(path, header(), intent("A"), tail=orjson.dumps(bad) + b"\n")
    with pytest.raises(
        LedgerError,
        match=rf"l.jsonl:3: damaged ledger record: field {field} "
        rf"{said}",
    ) as caught:
        read_state(path)
    assert caught.value.exit_code == Exit.USAGE


@pytest.mark.parametrize("value", [b"[1, 2]", b"7", b'"text"'])
def test_json_that_is_not_an_object_is_damage_named_by_its_line(
    tmp_path: Path, value: bytes
) -> None:
    """A line of valid JSON that is not an object (a list, a number) after the header is
    damage naming FILE:LINE, for a reader and a run alike: never a traceback."""
    path = tmp_path / "l.jsonl"
    data = write(path, header(), intent("A"), tail=value + b"\n" + line(intent("B")))
    said = r"l.jsonl:3: damaged ledger record: a record must be a JSON object"
    with pytest.raises(LedgerError, match=said):
        read_state(path)
    with pytest.raises(LedgerError, match=said):
        Ledger.open(path, target=TARGET)
    assert path.read_bytes() == data


def test_a_missing_field_and_an_unknown_type_are_named(tmp_path: Path) -> None:
    """A record without a required field, or of a type we never write, is damage."""
    path = tmp_path / "l.jsonl"
    bare = orjson.loads(line(intent("A")))
    del bare["attempt"]
    write(path, header(), tail=orjson.dumps(bare) + b"\n")
    with pytest.raises(LedgerError, match=r":2: .*field attempt is missing"):
        read_state(path)
    write(path, header(), tail=b'{"type":"note"}\n')
    with pytest.raises(LedgerError, match=r":2: .*field type must be one of run, intent"):
        read_state(path)


@pytest.mark.parametrize(
    "content",
    [
        b"[server]\nport = 8080",  # a config file
        b"endpoint = https://example.com",  # one line, no final newline: not torn, not ours
        b'{"Name": "\xe5\x8d\x8e\xe5\x8c\x97", "ProjectName": "default"}\n',  # the manifest
        b'{"type": "result", "name": "A", "outcome": "created"}\n',  # a record but no header
        b"\n" + line(header()),  # an empty line first
        b"x" * (MAX_RECORD_BYTES + 10),  # one endless line
    ],
    ids=["config", "one-line-no-newline", "manifest", "no-header", "empty-first", "huge"],
)
def test_a_file_that_is_not_a_ledger_is_refused_untouched(tmp_path: Path, content: bytes) -> None:
    """Only a file that starts with our run header is a ledger: anything else is refused,
    not truncated, and no lock file is left beside it."""
    path = tmp_path / "settings.conf"
    path.write_bytes(content)
    with pytest.raises(LedgerError, match=r"is not a worker ledger.*nothing was changed"):
        Ledger.open(path, target=TARGET)
    with pytest.raises(LedgerError, match="is not a worker ledger"):
        read_state(path)
    assert path.read_bytes() == content
    assert not lock_path(path).exists()


def test_an_empty_file_is_adopted(tmp_path: Path) -> None:
    """A 0-byte file (touched beforehand) becomes a new ledger."""
    path = tmp_path / "l.jsonl"
    path.touch()
    with Ledger.open(path, target=TARGET) as book:
        book.append(header())
    assert read_state(path).runs == [header()]


def test_an_over_long_line_is_damage_not_data(tmp_path: Path) -> None:
    """A line past MAX_RECORD_BYTES is an error naming it; a torn tail that long is too."""
    path = tmp_path / "l.jsonl"
    write(path, header(), tail=b'{"type":"intent","name":"' + b"a" * MAX_RECORD_BYTES + b'"}\n')
    with pytest.raises(LedgerError, match=r":2: damaged ledger record: the line is longer"):
        read_state(path)


def test_a_record_too_long_to_read_back_is_not_written(tmp_path: Path) -> None:
    """append refuses a record over the line bound (LedgerWriteError) and writes nothing."""
    path = tmp_path / "l.jsonl"
    with Ledger.open(path, target=TARGET) as book:
        book.append(header())
        before = path.read_bytes()
        huge = Intent(
            run_id="r1",
            action=Action.CREATE,
            name="A",
            line=1,
            fingerprint=F1,
            attempt=1,
            at="t",
            body={"Name": "a" * MAX_RECORD_BYTES},
        )
        with pytest.raises(LedgerWriteError, match="over the"):
            book.append(huge)
        book.append(footer())  # not broken: nothing was written
    assert path.read_bytes() == before + line(footer())


def test_non_regular_files_are_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO (opening it must not wait for a writer), /dev/null, a directory and a socket
    are refused by name, for writing and for reading."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        for path, kind in (
            (fifo, r"a FIFO \(named pipe\)"),
            (Path("/dev/null"), "a character device"),
            (tmp_path, "a directory"),
            (sock_path, "a socket"),
        ):
            with pytest.raises(LedgerError, match=f"is {kind}; a ledger must be a regular"):
                Ledger.open(path, target=TARGET)
            with pytest.raises(LedgerError, match=f"is {kind}"):
                read_state(path)
    assert not Path("/dev/null.lock").exists()


def test_symlinks_are_followed_only_to_a_regular_file(tmp_path: Path) -> None:
    """A link to a regular ledger works (and locks beside its target); a link to a device or
    to nothing is refused, and nothing is created through it."""
    real = tmp_path / "real.jsonl"
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    with pytest.raises(LedgerError, match=r"symbolic link to .*does not exist"):
        Ledger.open(link, target=TARGET)
    assert not real.exists()
    real.touch()
    with Ledger.open(link, target=TARGET) as book:
        book.append(header())
        assert lock_path(link) == tmp_path / "real.jsonl.lock"
        with pytest.raises(LedgerLocked):
            Ledger.open(real, target=TARGET)
    dev = tmp_path / "dev.jsonl"
    dev.symlink_to("/dev/null")
    with pytest.raises(LedgerError, match="a character device"):
        Ledger.open(dev, target=TARGET)


def test_another_targets_ledger_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """A ledger written for another endpoint/region/key: LedgerTargetMismatch (exit 2) naming
    both targets and the way out; the file (torn tail included) is left as it was."""
    path = tmp_path / "l.jsonl"
    data = write(path, header(target=OTHER), tail=b'{"type":"in')
    with pytest.raises(LedgerTargetMismatch) as caught:
        Ledger.open(path, target=TARGET)
    message = str(caught.value)
    assert str(OTHER) in message and str(TARGET) in message
    assert "use another --ledger for this target, or move this one aside" in message.lower()
    assert caught.value.exit_code == Exit.USAGE
    assert path.read_bytes() == data
    assert read_state(path).target == OTHER  # readers do not check, they tell


def test_a_later_header_of_another_target_is_refused_too(tmp_path: Path) -> None:
    """Every header is checked, not only the first."""
    path = tmp_path / "l.jsonl"
    data = write(path, header(), footer(), header("r2", target=OTHER), tail=b"{")
    with pytest.raises(LedgerTargetMismatch):
        Ledger.open(path, target=TARGET)
    assert path.read_bytes() == data


def test_a_ledger_of_worker_0_1_is_refused_as_older(tmp_path: Path) -> None:
    """A header without a target (worker 0.1) is refused the same way, saying why."""
    path = tmp_path / "l.jsonl"
    old = orjson.loads(line(header()))
    del old["target"]
    old["version"] = "0.1.0"
    path.write_bytes(orjson.dumps(old) + b"\n")
    with pytest.raises(LedgerTargetMismatch, match=r"older version of worker \('0.1.0'\)"):
        Ledger.open(path, target=TARGET)


def test_second_open_is_locked_out_and_the_message_names_the_lock(tmp_path: Path) -> None:
    """While one run holds the ledger, another gets LedgerLocked (exit 5) naming the lock
    file; after close it can open it."""
    path = tmp_path / "l.jsonl"
    holder = Holder(pid=4242, host="box-1", command="worker run m.jsonl", started="T")
    with Ledger.open(path, target=TARGET, holder=holder):
        with pytest.raises(LedgerLocked) as caught:
            Ledger.open(path, target=TARGET)
        said = str(caught.value)
        assert said.startswith(
            f"another run is using {path}: pid 4242 on host box-1 (worker run m.jsonl, "
            f"started T) holds its lock {lock_path(path)}. A held lock is always a live process"
        )
        assert "ps -p 4242` on box-1" in said
        assert caught.value.exit_code == Exit.LOCKED
    Ledger.open(path, target=TARGET).close()
    assert lock_path(path).exists()  # never deleted: deleting lock files races


def test_moving_the_ledger_aside_does_not_let_a_second_run_in(tmp_path: Path) -> None:
    """The lock stays with the path: after `mv ledger aside`, a run on the same path still
    waits for the first to finish."""
    path = tmp_path / "l.jsonl"
    with Ledger.open(path, target=TARGET) as first:
        first.append(header())
        path.rename(tmp_path / "aside.jsonl")
        with pytest.raises(LedgerLocked):
            Ledger.open(path, target=TARGET)


HOLDER = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(60)
""")


def hold_lock(lock: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    return proc


def test_a_lock_left_by_kill_9_does_not_block(tmp_path: Path) -> None:
    """A process killed while holding the lock leaves no stale lock: the kernel drops it."""
    path = tmp_path / "l.jsonl"
    holder = hold_lock(lock_path(path))
    try:
        with pytest.raises(LedgerLocked):
            Ledger.open(path, target=TARGET)
        assert probe_lock(path) is True
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    assert probe_lock(path) is False
    Ledger.open(path, target=TARGET).close()


def test_probe_lock_never_creates_the_lock_file(tmp_path: Path) -> None:
    """report's probe says False for a ledger no run ever locked, and leaves no file."""
    path = tmp_path / "l.jsonl"
    assert probe_lock(path) is False
    assert not lock_path(path).exists()


WRITER = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    from worker.errors import LedgerWriteError
    from worker.ledger.journal import Ledger
    from tests.test_ledger import TARGET, header, intent
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    book = Ledger.open(Path(sys.argv[1]), target=TARGET)
    book.append(header())
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))  # a disk that is now full
    for kind in ("first", "after"):
        try:
            for _ in range(100):
                book.append(intent("A"))
        except LedgerWriteError as exc:
            print(kind, type(exc).__name__, int(exc.exit_code), exc)
    book.close()
""")


def test_a_failed_write_mid_run_is_a_ledger_write_error(tmp_path: Path) -> None:
    """A write that fails after the run started raises LedgerWriteError (exit 7), and so does
    every append after it; closing a broken ledger does not raise."""
    path = tmp_path / "l.jsonl"
    out = subprocess.run(
        [sys.executable, "-c", WRITER, str(path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        timeout=60,
        check=True,
    )
    first, after = out.stdout.splitlines()
    assert first.startswith("first LedgerWriteError 7 ") and "cannot write the ledger" in first
    assert after.startswith("after LedgerWriteError 7 ")


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_a_full_disk_says_which_derived_files_may_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    """A full disk (or quota) names the derived files beside the ledger that can be deleted
    to make room; other failures do not (deleting them would not help)."""
    path = tmp_path / "l.jsonl"
    with Ledger.open(path, target=TARGET) as book:
        book.append(header())

        def full(fd: int, data: Any) -> int:
            raise OSError(err, os.strerror(err))

        monkeypatch.setattr(os, "write", full)
        with pytest.raises(LedgerWriteError) as info:
            book.append(intent("A"))
        monkeypatch.undo()
    hint = "l.jsonl.spool and l.jsonl.index beside it may be deleted"
    assert (hint in str(info.value)) is (err != errno.EIO)
    assert os.strerror(err) in str(info.value)


GROWER = textwrap.dedent("""
    import json, resource, signal, sys
    from pathlib import Path
    from structlog.testing import capture_logs
    from worker.ledger import layout
    from worker.ledger.journal import Ledger
    from tests.test_ledger import TARGET, header, intent
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    book = Ledger.open(Path(sys.argv[1]), target=TARGET)  # a new index: the smallest table
    book.append(header())
    # Room for the ledger (~0.5 MB), not for the doubled table the index grows into.
    grown = layout.HEADER_BYTES + 2 * layout.MIN_SLOTS * layout.SLOT_BYTES
    resource.setrlimit(resource.RLIMIT_FSIZE, (grown - 1, grown - 1))
    with capture_logs() as logs:
        for i in range(int(sys.argv[2])):
            book.append(intent(f"N{i}", line=i + 1))
    table = book.state.latest
    book.close()
    print(json.dumps({"memory": table.in_memory, "names": len(table), "logs": logs}))
""")


def test_an_index_that_cannot_grow_mid_run_does_not_stop_it(tmp_path: Path) -> None:
    """The shared index must double mid-run and the disk refuses (EFBIG): the run goes on
    with the table in memory, says so once, removes the index it left marked dirty, and
    every later reader and run read every Name from the ledger."""
    path = tmp_path / "l.jsonl"
    n = 2500  # past the smallest table's load limit (2458)
    out = subprocess.run(
        [sys.executable, "-c", GROWER, str(path), str(n)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        timeout=60,
    )
    assert out.returncode == 0 and "Exception ignored" not in out.stderr, out.stderr
    got = orjson.loads(out.stdout)
    assert got["memory"] is True and got["names"] == n
    (event,) = [e for e in got["logs"] if e["event"] == "ledger.index_unavailable"]
    assert event["reason"] == "File too large" and event["instead"] == "memory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.jsonl", "l.jsonl.lock"]
    state = read_state(path)
    assert len(state.latest) == n and all(state.latest[f"N{i}"].in_doubt for i in range(n))
    with Ledger.open(path, target=TARGET) as book:
        assert len(book.state.latest) == n
    assert (tmp_path / "l.jsonl.index").read_bytes()[8:12] == b"\1\0\0\0"  # rebuilt, clean


def test_an_invalid_duplicate_does_not_hide_the_valid_lines_state() -> None:
    """The invalid line of a duplicate Name is kept by line; the Name's state is what was
    sent for its valid line, whatever order the records came in."""
    state = State()
    for record in (
        header(),
        intent("A", line=3),
        result("A", Outcome.INVALID, None, line=7),
        result("A", Outcome.CREATED, line=3),
        result(None, Outcome.INVALID, None, 9),
    ):
        state.fold(record)
    assert state.latest["A"].outcome is Outcome.CREATED
    assert state.invalid_lines == {7: "A", 9: None}
    state.fold(header("r2"))
    assert state.invalid_lines == {}  # per run


def group(name: str, fingerprint: str = F1) -> Group:
    return Group(name=name, line=1, body=b"{}", fingerprint=fingerprint)


def latest(**records: Intent | Result) -> dict[str, Latest]:
    return {name: Latest.of(record) for name, record in records.items()}


@pytest.mark.parametrize(
    ("known", "item", "expected"),
    [
        ({}, group("A"), (run_plan.Do.SEND, "new")),
        (latest(A=intent("A")), group("A"), (run_plan.Do.SEND, "in_doubt")),
        (latest(A=result("A", Outcome.CREATED)), group("A"), (run_plan.Do.SKIP, "done")),
        (latest(A=result("A", Outcome.EXISTS)), group("A", F2), (run_plan.Do.SKIP, "done_changed")),
        (
            latest(A=result("A", Outcome.REJECTED)),
            group("A"),
            (run_plan.Do.SKIP, "rejected_unchanged"),
        ),
        (latest(A=result("A", Outcome.REJECTED)), group("A", F2), (run_plan.Do.SEND, "fixed")),
        (latest(A=result("A", Outcome.INVALID, None)), group("A"), (run_plan.Do.SEND, "fixed")),
        (latest(A=result("A", Outcome.DEFERRED)), group("A"), (run_plan.Do.SEND, "deferred")),
        (
            {},
            Invalid(line=3, name=None, problem=Problem("m", 3, "Name", "x")),
            (run_plan.Do.RECORD_INVALID, "invalid"),
        ),
    ],
)
def test_plan_decisions(
    known: dict[str, Latest], item: Group | Invalid, expected: tuple[run_plan.Do, str]
) -> None:
    """Skip what is done or unchanged-rejected; resend deferred, in-doubt, fixed and new."""
    decision = run_plan.decide(item, known)
    assert (decision.do, decision.why) == expected


def test_an_index_that_does_not_match_its_ledger_is_rebuilt_never_refused(
    tmp_path: Path,
) -> None:
    """An index sealed by a run that miscounted the ledger's end (as when a second writer
    appended unseen) claims a prefix ending inside a line: it is rebuilt, and the ledger
    opens with every Name's word, for a reader and for a run."""
    path = tmp_path / "l.jsonl"
    with Ledger.open(path, target=TARGET) as book:
        for record in (header(), intent("A"), result("A", Outcome.CREATED), intent("B")):
            book.append(record)
        book._end -= 20
    state = read_state(path)
    assert state.latest["A"].outcome is Outcome.CREATED and state.latest["B"].in_doubt
    state.close()
    with Ledger.open(path, target=TARGET) as book:
        assert book.state.latest["A"].outcome is Outcome.CREATED
        assert book.state.latest["B"].in_doubt


def test_damage_in_the_ledger_itself_never_advises_throwing_it_away(tmp_path: Path) -> None:
    """A line that is not JSON is the ledger's own damage: the message names the line and
    says to fix it and keep the ledger, not to move it aside."""
    path = tmp_path / "l.jsonl"
    write(path, header(), intent("A"), tail=b"not json\n" + line(intent("B")))
    with pytest.raises(LedgerError) as caught:
        Ledger.open(path, target=TARGET)
    message = str(caught.value)
    assert message.startswith(f"{path}:3: damaged ledger record")
    assert "keep the ledger" in message and "aside" not in message


def _flip(path: Path, name: str, outcome: Outcome) -> None:
    ipath = index.index_path(path)
    raw = bytearray(ipath.read_bytes())
    at = raw.find(layout.name_key(name), layout.HEADER_BYTES)
    assert at >= 0 and (at - layout.HEADER_BYTES) % layout.SLOT_BYTES == 0
    raw[at + 64] = (None, *Outcome).index(outcome)
    ipath.write_bytes(bytes(raw))


def test_a_reader_never_trusts_a_slot_that_fails_its_check(tmp_path: Path) -> None:
    """A slot edited deferred -> created reads as deferred for a reader (report, dry run),
    through a private rebuild that leaves the shared index as it found it; a run holding
    the lock rebuilds the shared one, and the next reader finds it clean and right."""
    path = tmp_path / "l.jsonl"
    with Ledger.open(path, target=TARGET) as book:
        for record in (header(), intent("A"), result("A", Outcome.DEFERRED), footer()):
            book.append(record)
        book.append(intent("B"))
    _flip(path, "A", Outcome.CREATED)
    edited = index.index_path(path).read_bytes()
    state = read_state(path)
    assert state.latest["A"].outcome is Outcome.DEFERRED
    assert [e.outcome for e in state.latest.values()].count(Outcome.DEFERRED) == 1
    state.close()
    assert index.index_path(path).read_bytes() == edited
    with Ledger.open(path, target=TARGET) as book:
        assert book.state.latest["A"].outcome is Outcome.DEFERRED
        assert len(book.state.latest) == 2
    assert index.index_path(path).read_bytes()[8:12] == b"\1\0\0\0"  # clean again
    again = read_state(path)
    assert again.latest["A"].outcome is Outcome.DEFERRED and again.latest["B"].in_doubt
    again.close()


def test_closing_the_ledger_drops_the_file_lock_while_its_state_lives_on(
    tmp_path: Path,
) -> None:
    """The state's index keeps a duplicate of the ledger's descriptor after close: the lock
    on the file is dropped all the same, so the next open (any path to it) gets in."""
    path = tmp_path / "l.jsonl"
    book = Ledger.open(path, target=TARGET)
    book.append(header())
    kept = book.state
    os.link(path, tmp_path / "link.jsonl")
    with pytest.raises(LedgerLocked, match="hard link"):
        Ledger.open(tmp_path / "link.jsonl", target=TARGET)
    assert probe_lock(tmp_path / "link.jsonl") is True
    book.close()
    assert probe_lock(tmp_path / "link.jsonl") is False
    Ledger.open(tmp_path / "link.jsonl", target=TARGET).close()
    assert len(kept.latest) == 0
    kept.close()


def test_an_index_whose_trailer_was_edited_is_rebuilt(tmp_path: Path) -> None:
    """The trailer (run headers, footers, codes) is sealed with the header: one edited in
    place, same length, is not believed; the ledger's own words are read instead."""
    path = tmp_path / "l.jsonl"
    with Ledger.open(path, target=TARGET) as book:
        book.append(header())
        book.append(footer())
    ipath = index.index_path(path)
    raw = ipath.read_bytes()
    assert raw.count(b'"items":3') == 1
    ipath.write_bytes(raw.replace(b'"items":3', b'"items":4'))
    state = read_state(path)
    assert state.header is not None and state.header.items == 3
    state.close()
    with Ledger.open(path, target=TARGET) as book:
        assert book.state.runs[0].items == 3
