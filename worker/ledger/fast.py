"""The rebuild's fast path: an intent or result line decoded and type-checked in one C call
(msgspec), straight into the fold's Item.

Why. A rebuild reads every ledger line, two per Name, and at 10^6 Names decoding them with
orjson and then checking each field in Python (schema.item_of) was 2.6 µs a line, most of
the rebuild's time; msgspec does both in C from the declarations below, 1.4 µs with the
Item made (measured on the ledgers bench.scale writes).

Never a different verdict. `item_of_line` accepts a strict subset of what the reader's
own path (orjson, then schema.item_of / schema.parse) accepts, and gives the same Item for
it; on anything else it returns None and the caller takes that path, which names the file,
the line and the field, or accepts an unusual but valid record. The subset:

* exactly the fields of Intent or Result (records.py), each of exactly the type `parse`
  checks, integers non-negative (and below 2^63: orjson reads larger ones as floats, which
  `parse` refuses); no field we do not write (`forbid_unknown_fields`: `parse` ignores
  them, and msgspec would skip their values unchecked);
* a body of the shape we write (Name, ProjectName, Tags: strings, and a list of objects of
  strings): every value in it is decoded, so its strings are checked as UTF-8 and its JSON
  as JSON, as orjson checks them. No numbers: a skipped or decoded number is not checked
  the way orjson checks one (orjson refuses one beyond a double's range);
* the JSON itself: msgspec refuses what orjson refuses (control characters, lone
  surrogates, invalid UTF-8 in a decoded string, trailing bytes, leading zeros), tested on
  each case in tests/test_ledger_fast.py; a repeated key is taken last by both, and msgspec
  checks every copy of it (a copy `parse` would not see can only send a line to the slow
  path, never pass one).

The file's first line never comes here: it must be a run header (file.Reader says so).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Final

import msgspec

from worker.ledger.records import Action, Intent, Item, Outcome, Result

# Every count, line, status and exit code we write is a non-negative integer (schema._int);
# msgspec bounds must fit in 64 signed bits, and orjson reads an integer from 2^64 on as a
# float (refused): the rare one between takes the slow path.
_Count = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
_Sha256 = Annotated[str, msgspec.Meta(pattern=r"\A[0-9a-f]{64}\Z")]  # schema._SHA256_HEX
_Body = dict[str, str | list[dict[str, str]]]


class _IntentLine(
    msgspec.Struct, tag_field="type", tag="intent", forbid_unknown_fields=True, gc=False
):
    run_id: str
    action: Action
    name: str
    line: _Count
    fingerprint: _Sha256 | None
    attempt: _Count
    at: str
    body: _Body


class _ResultLine(
    msgspec.Struct, tag_field="type", tag="result", forbid_unknown_fields=True, gc=False
):
    run_id: str
    action: Action | None
    name: str | None
    outcome: Outcome
    status: _Count | None
    code: str
    message: str
    request_id: str
    sends: _Count
    fingerprint: _Sha256 | None
    line: _Count
    started: str
    finished: str
    body: _Body | None = None


# A field added to Intent or Result must be declared here too (the slow path would take
# every line that holds it): this stops the import until it is.
for _record, _line in ((Intent, _IntentLine), (Result, _ResultLine)):
    assert {f.name for f in dataclasses.fields(_record)} - {"type"} == set(
        _line.__struct_fields__
    ), f"ledger.fast must declare every {_record.__name__} field"

_decode: Final = msgspec.json.Decoder(_IntentLine | _ResultLine).decode
_new_item: Final = tuple.__new__  # Item's fields in order, without NamedTuple's keywords


def item_of_line(raw: bytes) -> Item | None:
    """The fold's Item of an intent or result line (not the file's first), if the line is
    one the fast path vouches for (module docstring); else None: take the reader's path."""
    try:
        rec = _decode(raw)
    except msgspec.DecodeError:  # malformed, or not of the declared types
        return None
    if type(rec) is _ResultLine:
        return _new_item(
            Item, (rec.name, rec.line, rec.fingerprint, rec.action, rec.outcome, rec.code)
        )
    assert type(rec) is _IntentLine
    return _new_item(Item, (rec.name, rec.line, rec.fingerprint, rec.action, None, ""))
