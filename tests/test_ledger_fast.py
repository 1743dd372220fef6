"""Ledger: the rebuild's fast path (ledger/fast.py, msgspec) never gives another verdict than
the reader's own path (orjson, then schema.item_of / schema.parse): every line it vouches
for is one that path accepts, with the same Item; everything else it leaves to that path,
which names the file, the line and the field."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from worker.errors import LedgerError
from worker.ledger.fast import item_of_line
from worker.ledger.load import read_state
from worker.ledger.records import Action, Intent, Item, Outcome, Result
from worker.ledger.schema import item_of, parse

FP = "0123456789abcdef" * 4


def _intent(**over: Any) -> bytes:
    record = Intent(
        run_id="r1",
        action=Action.CREATE,
        name="组1",
        line=3,
        fingerprint=FP,
        attempt=1,
        at="2024-01-01T00:00:00.000Z",
        body={
            "Name": "组1",
            "ProjectName": "default",
            "Tags": [{"Key": "批次", "Value": "b1", "Category": "Custom"}],
        },
    )
    return orjson.dumps(orjson.loads(orjson.dumps(record)) | over)


def _result(**over: Any) -> bytes:
    record = Result(
        run_id="r1",
        action=Action.CREATE,
        name="组1",
        outcome=Outcome.CREATED,
        status=200,
        code="",
        message="",
        request_id="rq",
        sends=1,
        fingerprint=FP,
        line=3,
        started="t",
        finished="t",
    )
    return orjson.dumps(orjson.loads(orjson.dumps(record)) | over)


def _old(raw: bytes) -> Item | None:
    """The reader's own verdict: the Item, or None when it refuses the line."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    item = item_of(obj)
    if item is not None:
        return item
    try:
        record = parse(obj, where="x:2")
    except LedgerError:
        return None
    return Item.of(record) if isinstance(record, (Intent, Result)) else None


def _agrees(raw: bytes) -> None:
    fast = item_of_line(raw)
    if fast is not None:
        assert fast == _old(raw), raw
        assert type(fast) is Item


INTENT, RESULT = _intent(), _result()
CASES: list[bytes] = [
    INTENT,
    RESULT,
    _result(body={"Name": "组1", "Tags": []}),
    _result(outcome="invalid", action=None, name=None, status=None, code="InvalidManifestLine"),
    _result(outcome="deferred", code="Throttled", status=None, fingerprint=None),
    _intent(action="delete", fingerprint=None, line=0, body={"Name": "组1"}),
    # wrong types and values: `parse` names the field; the fast path must step aside
    _result(outcome="made"),
    _result(status="200"),
    _result(line=-4),
    _result(line=True),
    _result(line=1.0),
    _result(line=1 << 63),
    _result(line=(1 << 64) - 1),  # an integer orjson reads and parse accepts
    _result(fingerprint="xyz"),
    _result(fingerprint=FP.upper()),
    _result(name=7),
    _result(code=None),
    _intent(body=[]),
    _intent(body=None),
    _intent(action=None),
    _intent(attempt=-1),
    _intent(extra="a field we never write"),
    _intent(body={"Name": "组1", "Priority": 3}),  # a body of another shape: the slow path
    _intent(body={"Name": {"deep": ["x"]}}),
    _result(type="run"),
    _result(type="note"),
    b'{"type":"intent"}',
    b"[1, 2]",
    b"7",
    b"null",
    b"GARBAGE",
    b"",
    # JSON that orjson refuses (the line "is not JSON")
    INTENT[:-1] + b",}",
    INTENT + b"x",
    b"\xef\xbb\xbf" + INTENT,
    INTENT.replace(b'"b1"', b'"\xff"'),
    INTENT.replace(b'"b1"', b'"\xed\xa0\x80"'),
    INTENT.replace(b'"b1"', b'"\xc0\xaf"'),
    INTENT.replace(b'"Key"', b'"K\xffey"'),
    INTENT.replace(b'"b1"', b'"\\ud800"'),
    INTENT.replace(b'"b1"', b'"\\udc00\\ud800"'),
    INTENT.replace(b'"b1"', b'"\x01"'),
    INTENT.replace(b'"b1"', b'"\t"'),
    INTENT.replace(b'"b1"', b'"\\x"'),
    INTENT.replace(b'"line":3', b'"line":03'),
    INTENT.replace(b'"line":3', b'"line":1e400'),
    INTENT.replace(b'"b1"', b"1" + b"0" * 400),
    INTENT.replace(b'"b1"', b"1e400"),
    INTENT.replace(b'"b1"', b"NaN"),
    INTENT.replace(b'"b1"', b"[" * 1100 + b"]" * 1100),
    # what orjson accepts and reads the same way (the fast path may take it)
    b" \t" + INTENT + b" \r",
    INTENT.replace(b'"line":3', b'"line":-0'),
    INTENT.replace(b'"name"', b'"n\\u0061me"'),
    INTENT.replace(b'"create"', b'"cre\\u0061te"'),
    INTENT.replace(b'"b1"', b'"\\ud83d\\ude00\\u0000\\/"'),
    # a repeated key: the last one counts for both
    INTENT[:-1] + b',"line":9}',
    INTENT.replace(b'"line":3', b'"line":-1,"line":3'),
    INTENT[:-1] + b',"line":-1}',
    INTENT[:-1] + b',"type":"result"}',
    INTENT.replace(b'"type":"intent"', b'"type":"run","type":"intent"'),
    INTENT[:-1] + b',"body":5}',
    b'{"line":3,' + INTENT[1:],
]


@pytest.mark.parametrize("raw", CASES, ids=range(len(CASES)))
def test_the_fast_path_agrees_with_the_readers_verdict(raw: bytes) -> None:
    _agrees(raw)


def test_the_fast_path_takes_the_lines_we_write() -> None:
    """The point of it: every intent and result a run writes goes the fast way."""
    for raw in CASES[:6]:
        assert item_of_line(raw) is not None, raw


@pytest.mark.parametrize("seed", range(4))
def test_damaged_copies_of_valid_lines_get_the_same_verdict(seed: int) -> None:
    """Random byte edits, cuts and insertions of valid lines: wherever the fast path
    vouches for one, the reader's own path accepts it with the same Item."""
    rng = random.Random(seed)
    alphabet = b'{}[]":,\\ 0123456789-.eE+abcdeftrunlTSxu\xff\xc3\xa9\n\t\x00'
    for _ in range(3000):
        raw = bytearray(rng.choice(CASES[:6]))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(raw))
            edit = rng.randrange(3)
            if edit == 0:
                raw[at] = rng.choice(alphabet)
            elif edit == 1:
                del raw[at]
            else:
                raw.insert(at, rng.choice(alphabet))
        _agrees(bytes(raw))


def _ledger(path: Path, *lines: bytes) -> None:
    head = (
        b'{"type":"run","run_id":"r1","started":"t","version":"0.2.0","command":"run",'
        b'"target":{"endpoint":"http://127.0.0.1:8080","region":"cn-north-1",'
        b'"access_key":"AKTEST"},"manifest":"/m.jsonl","manifest_sha256":"' + b"a" * 64 + b'",'
        b'"items":3,"plan":{"new":3},"settings":{}}'
    )
    path.write_bytes(b"\n".join([head, *lines]) + b"\n")


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        (_result(line=-4), r"l.jsonl:3: damaged ledger record: field line must not be negative"),
        (
            _result(status="200"),
            r"l.jsonl:3: damaged ledger record: field status must be an integer",
        ),
        (_intent(body=[]), r"l.jsonl:3: damaged ledger record: field body must be an object"),
        (
            INTENT.replace(b'"b1"', b'"\xff"'),
            r"l.jsonl:3: damaged ledger record: the line is not JSON",
        ),
        (
            INTENT.replace(b'"b1"', b"1e400"),
            r"l.jsonl:3: damaged ledger record: the line is not JSON",
        ),
    ],
)
def test_a_rebuild_names_the_damaged_line(tmp_path: Path, bad: bytes, said: str) -> None:
    """Damage is refused by a rebuild (which takes the fast path) as it always was."""
    path = tmp_path / "l.jsonl"
    _ledger(path, INTENT, bad, RESULT)
    with pytest.raises(LedgerError, match=said):
        read_state(path)


def test_a_valid_intent_as_the_first_line_is_not_a_ledger(tmp_path: Path) -> None:
    """The first line must be a run header: the fast path never reads it."""
    path = tmp_path / "l.jsonl"
    path.write_bytes(INTENT + b"\n" + RESULT + b"\n")
    with pytest.raises(LedgerError, match="is not a worker ledger"):
        read_state(path)


def test_a_rebuild_through_the_fast_path_keeps_each_names_latest_word(tmp_path: Path) -> None:
    """Lines of both kinds, fast and slow, fold in their order."""
    path = tmp_path / "l.jsonl"
    _ledger(
        path,
        _intent(name="A"),
        _result(name="A", outcome="deferred", code="Throttled"),
        _intent(name="B", extra=1),  # the slow path: an unknown field
        _result(name="B", outcome="created", extra=1),
        _intent(name="A", attempt=2),
    )
    state = read_state(path)
    try:
        a, b = state.latest.get("A"), state.latest.get("B")
        assert a is not None and a.outcome is None  # in doubt: the intent came last
        assert b is not None and b.outcome is Outcome.CREATED and b.fingerprint == FP
    finally:
        state.close()
