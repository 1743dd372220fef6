"""The rules a manifest line must meet: one line's bytes → a Group, its problems, or
blank. Pure: no file, no spool; the line number and path only name the problems.

A valid line becomes canonical JSON (Name, ProjectName, Tags if any): the exact bytes that
are signed and sent, and whose sha256 is the fingerprint the ledger compares.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Final

import orjson

from worker.api import spec
from worker.errors import Problem
from worker.manifest.values import MAX_LINE_BYTES, Group


def parse_line(path: Path, lineno: int, raw: bytes) -> Group | list[Problem] | None:
    """A Group, the line's problems, or None for a blank line."""
    got = judge(path, lineno, raw)
    if isinstance(got, tuple):
        name, body, fingerprint = got
        return Group(name=name, line=lineno, body=body, fingerprint=fingerprint)
    return got


def judge(path: Path, lineno: int, raw: bytes) -> tuple[str, bytes, str] | list[Problem] | None:
    """`parse_line` without the Group: (Name, canonical body, fingerprint) of a valid line
    (the scan spools them: making a Group for each of 10^6 lines cost a second).

    A line already in its canonical form is judged on orjson's word alone: bytes it decodes
    are valid UTF-8 without a NUL or a lone surrogate, and not blank, so the checks below
    that say why a line is not JSON have nothing to say about it."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        obj = None
    if type(obj) is dict and (group := _canonical_group(raw, obj)) is not None:
        return group
    return _judge(path, lineno, raw)


def _judge(path: Path, lineno: int, raw: bytes) -> tuple[str, bytes, str] | list[Problem] | None:
    where = str(path)

    def problem(field_name: str, reason: str) -> list[Problem]:
        return [Problem(where, lineno, field_name, reason)]

    if raw == b"":
        return problem("line", f"is longer than {MAX_LINE_BYTES} bytes")
    if (nul := raw.find(b"\x00")) >= 0:
        return problem("line", f"holds a NUL byte at byte {nul + 1}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return problem("line", f"is not valid UTF-8 (byte {exc.start + 1})")
    if not text.strip():
        return None
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return problem("line", f"is not valid JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(obj, dict):
        return problem("line", f"must be a JSON object, not {spec.json_type(obj)}")
    if (group := _canonical_group(raw, obj)) is not None:
        return group
    if (twice := _repeated_key(text, obj)) is not None:
        # JSON parsers disagree on which one counts (orjson keeps the last): ambiguous, so
        # refused rather than guessed.
        return problem(twice, "is given twice in one object; give it once")
    problems = [
        Problem(where, lineno, spec.label(k), "unknown field (allowed: Name, ProjectName, Tags)")
        for k in sorted(set(obj) - spec.CREATE_FIELDS)
    ]
    name = obj.get("Name")
    if "Name" not in obj:
        problems.append(Problem(where, lineno, "Name", "is required"))
    elif (reason := spec.name_problem(name)) is not None:
        problems.append(Problem(where, lineno, "Name", reason))
    project = obj.get("ProjectName", spec.DEFAULT_PROJECT)
    if not isinstance(project, str):
        problems.append(
            Problem(
                where, lineno, "ProjectName", f"must be a string, not {spec.json_type(project)}"
            )
        )
    elif not project:
        problems.append(
            Problem(where, lineno, "ProjectName", "must not be empty (leave it out for 'default')")
        )
    tags = obj.get("Tags", [])
    problems.extend(Problem(where, lineno, f, r) for f, r in spec.tags_problems(tags))
    if problems:
        return problems
    assert isinstance(name, str)
    return _group(name, project, tags)


_CANONICAL_KEYS: Final = (["Name", "ProjectName", "Tags"], ["Name", "ProjectName"])
_TAG_KEYS: Final = ["Key", "Value", "Category"]


def _canonical_group(raw: bytes, obj: dict[str, Any]) -> tuple[str, bytes, str] | None:
    """The verdict on a valid line that is already its own canonical body, byte for byte
    (what an export, a generator or an earlier canonicalisation writes): the common case,
    judged with a fraction of the work. None sends the line to the full rules, which judge
    everything else; every line accepted here is one they accept, with the same body.

    Why it holds: orjson re-encodes a decoded object with its keys in their order, so
    `dumps(obj) == raw` means no key was lost to a repeat (at any depth) and nothing was
    spelled another way (spaces, escapes). The keys then are the canonical ones in their
    order and each rule is checked below, so the body `_group` would build is `raw`."""
    if list(obj) not in _CANONICAL_KEYS:
        return None
    name, project, tags = obj["Name"], obj["ProjectName"], obj.get("Tags")
    if type(project) is not str or not project or spec.name_problem(name) is not None:
        return None
    if tags is not None:
        if type(tags) is not list or not tags:
            return None
        for t in tags:  # a loop, not all(<generator>): a generator per line cost 0.8 us
            if not (
                type(t) is dict
                and list(t) == _TAG_KEYS
                and type(t["Key"]) is str
                and type(t["Value"]) is str
                and t["Category"] in spec.TAG_CATEGORIES
            ):
                return None
    if orjson.dumps(obj) != raw:
        return None
    return name, raw, hashlib.sha256(raw).hexdigest()


def _repeated_key(text: str, obj: dict[str, Any]) -> str | None:
    """The field given twice in one object of this (valid JSON) line, or None.

    Cheap for every line: a key is written as `"...":`, so when the line holds exactly as
    many of those as the decoded line has keys (at the top and in its tags), no key was
    lost to a repeat. Anything that could blur that count (an escape, a space before a
    colon, an object nested deeper) sends the line to the exact check instead: decoded
    again by the standard library, which shows every key."""
    tags = obj.get("Tags")
    keys = len(obj)
    if isinstance(tags, list):
        keys += sum(len(t) for t in tags if isinstance(t, dict))
    if (
        text.count('":') == keys
        and "\\" not in text
        and '" ' not in text
        and '"\t' not in text
        and '"\r' not in text
    ):
        return None
    found: list[tuple[str, dict[str, Any]]] = []  # the first key given twice, its object

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        made = dict(items)
        if not found and len(made) != len(items):
            keys = [k for k, _ in items]
            found.append((next(k for i, k in enumerate(keys) if k in keys[:i]), made))
        return made

    decoded = json.loads(text, object_pairs_hook=pairs)
    if not found:
        return None
    key, where = found[0]
    tags = decoded.get("Tags")
    if where is not decoded and isinstance(tags, list):
        for i, tag in enumerate(tags):
            if tag is where:
                return f"Tags[{i}].{spec.label(key)}"
    return spec.label(key)


def _group(name: str, project: str, tags: list[dict[str, str]]) -> tuple[str, bytes, str]:
    body: dict[str, Any] = {"Name": name, "ProjectName": project}
    if tags:
        body["Tags"] = [
            {"Key": t["Key"], "Value": t["Value"], "Category": t["Category"]} for t in tags
        ]
    encoded = orjson.dumps(body)
    return name, encoded, hashlib.sha256(encoded).hexdigest()


def name_of(raw: bytes) -> str | None:
    """The Name of an invalid line, if it has a usable one (for the ledger and report)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    name = obj.get("Name") if isinstance(obj, dict) else None
    # Printable only: the Name goes to the ledger, reports and the terminal.
    ok = isinstance(name, str) and len(name) <= 200 and name.isprintable()
    return name if ok else None
