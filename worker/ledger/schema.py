"""Reading ledger records: `parse` checks a decoded ledger line field by field against the
record types (records.py); `item_of` is its fast path for the intents and results that make
up almost all of a ledger.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import math
import operator
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Final, Literal

from worker.errors import LedgerError, LedgerTargetMismatch
from worker.ledger.records import (
    Action,
    Footer,
    Intent,
    Item,
    Outcome,
    Record,
    Result,
    RunHeader,
    Target,
)

# -- reading ------------------------------------------------------------------------------
#
# `parse` is the only way a ledger line becomes a record. Each record type gets a table of
# per-field checkers, built once from the dataclass annotations, so the schema above is the
# one place that says what a field holds; a field added there is checked here unchanged.
# Unknown keys are ignored (a newer version may add fields); a missing key is an error
# unless the field has a default.

_KINDS: Final[dict[str, type[RunHeader | Intent | Result | Footer]]] = {
    "run": RunHeader,
    "intent": Intent,
    "result": Result,
    "end": Footer,
}
_SHA256_FIELDS: Final = frozenset({"fingerprint", "manifest_sha256"})
_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")


class _Bad(Exception):
    """A field's value is not of its declared type; `args[0]` says how."""


_Check = Callable[[Any], Any]
_MISSING: Final = object()


def parse(obj: Any, *, where: str) -> Record:
    """Check a decoded ledger line field by field and return the typed record.

    Raises LedgerError naming `where` (FILE:LINE) and the field; a run header without a
    `target` (written by worker 0.1) raises LedgerTargetMismatch, as a ledger of another
    target would.
    """
    if not isinstance(obj, dict):
        raise LedgerError(
            f"{where}: damaged ledger record: a record must be a JSON object, not {_json_type(obj)}"
        )
    kind = obj.get("type")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise LedgerError(
            f"{where}: damaged ledger record: field type must be one of "
            f"{', '.join(_KINDS)}, not {_shown(kind)}"
        )
    if cls is RunHeader and "target" not in obj:
        raise LedgerTargetMismatch(
            f"{where}: this ledger was written by an older version of worker "
            f"({_shown(obj.get('version'))}), which did not record its target (endpoint, "
            "region, access key); this version does not use it: use another --ledger, or "
            "move this one aside"
        )
    values: dict[str, Any] = {}
    for name, check, default in _TABLES[cls]:
        value = obj.get(name, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise LedgerError(f"{where}: damaged ledger record: field {name} is missing")
            continue
        try:
            values[name] = check(value)
        except _Bad as bad:
            said = str(bad)  # ".region ..." / "['new'] ...": a part of the field
            sep = "" if said.startswith((".", "[")) else " "
            raise LedgerError(f"{where}: damaged ledger record: field {name}{sep}{said}") from None
    return cls(**values)


def _fields(cls: type) -> tuple[tuple[str, _Check, Any], ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name == "type":
            continue  # already matched to pick `cls`
        check = _sha256 if f.name in _SHA256_FIELDS else _checker(hints[f.name])
        if f.name in _SHA256_FIELDS and _is_optional(hints[f.name]):
            check = _optional(check)
        default = f.default if f.default is not dataclasses.MISSING else _MISSING
        out.append((f.name, check, default))
    return tuple(out)


def _checker(tp: Any) -> _Check:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return lambda v: v
    if origin in (types.UnionType, typing.Union):
        others = [a for a in args if a is not type(None)]
        if len(others) == 1 and len(args) == 2:
            return _optional(_checker(others[0]))
        raise TypeError(f"unsupported annotation {tp}")
    if origin is Literal:
        allowed = args

        def literal(v: Any) -> Any:
            if v not in allowed:
                raise _Bad(f"must be {' or '.join(map(repr, allowed))}, not {_shown(v)}")
            return v

        return literal
    if isinstance(tp, type) and issubclass(tp, enum.StrEnum):
        by_value = {m.value: m for m in tp}

        def member(v: Any) -> Any:
            if not isinstance(v, str) or v not in by_value:
                raise _Bad(f"must be one of {', '.join(by_value)}, not {_shown(v)}")
            return by_value[v]

        return member
    if origin is dict:
        key, value = args
        assert key is str
        check_value = _checker(value)

        def mapping(v: Any) -> Any:
            if not isinstance(v, dict):
                raise _Bad(f"must be an object, not {_json_type(v)}")
            for k, item in v.items():
                try:
                    check_value(item)
                except _Bad as bad:
                    raise _Bad(f"[{k!r}] {bad}") from None
            return v

        return mapping
    if tp is Target:
        return _target
    if tp is str:
        return _str
    if tp is int:
        return _int
    if tp is float:
        return _float
    raise TypeError(f"unsupported annotation {tp}")


def _optional(check: _Check) -> _Check:
    def optional(v: Any) -> Any:
        if v is None:
            return None
        try:
            return check(v)
        except _Bad as bad:
            raise _Bad(f"{bad} (or null)") from None

    return optional


def _is_optional(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise _Bad(f"must be a string, not {_json_type(v)}")
    return v


def _int(v: Any) -> int:
    # Every count, line, status and exit code we write is a non-negative integer.
    if not isinstance(v, int) or isinstance(v, bool):
        raise _Bad(f"must be an integer, not {_json_type(v)}")
    if v < 0:
        raise _Bad(f"must not be negative, not {v}")
    return v


def _float(v: Any) -> float:
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise _Bad(f"must be a number, not {_json_type(v)}")
    if not math.isfinite(v) or v < 0:
        raise _Bad(f"must be a finite non-negative number, not {v}")
    return float(v)


def _sha256(v: Any) -> str:
    if not isinstance(v, str) or _SHA256_HEX.fullmatch(v) is None:
        raise _Bad(f"must be a sha256 in lowercase hex, not {_shown(v)}")
    return v


def _target(v: Any) -> Target:
    if not isinstance(v, dict):
        raise _Bad(f"must be an object, not {_json_type(v)}")
    values = {}
    for name in ("endpoint", "region", "access_key"):
        try:
            values[name] = _str(v.get(name))
        except _Bad as bad:
            raise _Bad(f".{name} {bad}") from None
    return Target(**values)


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


def _shown(v: Any) -> str:
    """A value as a message may quote it: bounded, one line."""
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


# Built once, after every annotation above can be resolved.
_TABLES: Final[dict[type, tuple[tuple[str, _Check, Any], ...]]] = {
    cls: _fields(cls) for cls in _KINDS.values()
}


# -- the fast path for reading a whole ledger ---------------------------------------------
#
# A ledger is almost all intent and result records, and `parse` spends most of its time in
# one checker call per field and in building a frozen dataclass that the state fold throws
# away. `item_of` checks the same fields with inline tests and returns only what the fold
# keeps. It accepts a strict subset of what `parse` accepts: on anything it does not like it
# returns None and the caller runs `parse`, which raises the precise error (or, for an
# unusual but valid record, returns it). So the fast path never changes a verdict.

_OUTCOME_OF: Final = {m.value: m for m in Outcome}
_ACTION_OF: Final = {m.value: m for m in Action}
# `item_of` checks these fields by hand: a field added to Intent or Result must be added
# there too, and this stops the import until it is.
assert {f.name for f in dataclasses.fields(Intent)} == {
    "type",
    "run_id",
    "action",
    "name",
    "line",
    "fingerprint",
    "attempt",
    "at",
    "body",
}, "schema.item_of must check every Intent field"
assert {f.name for f in dataclasses.fields(Result)} == {
    "type",
    "run_id",
    "action",
    "name",
    "outcome",
    "status",
    "code",
    "message",
    "request_id",
    "sends",
    "fingerprint",
    "line",
    "started",
    "finished",
    "body",
}, "schema.item_of must check every Result field"


# The fields `item_of` reads, each fetched in one C call, and every tuple of value types
# `parse` accepts for them: one set lookup checks them all by type (a field's type check
# one by one was most of the fold's time), before the few range checks.
_RESULT_FIELDS: Final = operator.itemgetter(
    "run_id", "action", "name", "outcome", "status", "code", "message", "request_id",
    "sends", "fingerprint", "line", "started", "finished",
)  # fmt: skip
_INTENT_FIELDS: Final = operator.itemgetter(
    "run_id", "action", "name", "line", "fingerprint", "attempt", "at", "body"
)
_OR_NULL: Final = (str, types.NoneType)
_RESULT_TYPES: Final = frozenset(
    itertools.product(
        (str,), _OR_NULL, _OR_NULL, (str,), (int, types.NoneType), (str,), (str,), (str,),
        (int,), _OR_NULL, (int,), (str,), (str,),
    )
)  # fmt: skip
_INTENT_TYPES: Final = frozenset(
    itertools.product((str,), (str,), (str,), (int,), _OR_NULL, (int,), (str,), (dict,))
)
_new_item: Final = tuple.__new__  # Item's fields in order, without NamedTuple's keywords


_is_sha256: Final = _SHA256_HEX.fullmatch


def item_of(obj: Any) -> Item | None:
    """The fold's view of a decoded intent or result line, if every field of it is exactly
    what `parse` accepts; None for anything else (another type, not an object, or something
    to look at closely: the caller then calls `parse`)."""
    kind = obj.get("type") if type(obj) is dict else None
    if kind == "result":
        try:
            values = _RESULT_FIELDS(obj)
        except KeyError:
            return None
        if tuple(map(type, values)) not in _RESULT_TYPES:
            return None
        _, action, name, outcome, status, code, _, _, sends, fp, line, _, _ = values
        body = obj.get("body")
        if (
            line < 0
            or sends < 0
            or (status is not None and status < 0)
            or (body is not None and type(body) is not dict)
            or (fp is not None and _is_sha256(fp) is None)
            or outcome not in _OUTCOME_OF
            or (action is not None and action not in _ACTION_OF)
        ):
            return None
        action = None if action is None else _ACTION_OF[action]
        return _new_item(Item, (name, line, fp, action, _OUTCOME_OF[outcome], code))
    if kind == "intent":
        try:
            values = _INTENT_FIELDS(obj)
        except KeyError:
            return None
        if tuple(map(type, values)) not in _INTENT_TYPES:
            return None
        _, action, name, line, fp, attempt, _, _ = values
        if line < 0 or attempt < 0 or action not in _ACTION_OF:
            return None
        if fp is not None and _is_sha256(fp) is None:
            return None
        return _new_item(Item, (name, line, fp, _ACTION_OF[action], None, ""))
    return None
