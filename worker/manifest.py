"""Manifest step: stream a JSONL file into validated groups, or problems naming file:line:field.

Two passes over the file, never the file in memory: `scan` validates every line before
anything is sent (and hashes the file for the ledger header); `read` streams it again and
yields each line as a `Group` to send or an `Invalid` to record. Only one small map grows
with the manifest: Name -> first line, to catch a Name given twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from worker import api
from worker.errors import ManifestError, Problem

MAX_LINE_BYTES = 1 << 20  # a group body is tiny; a longer line is a mistake, not data
MAX_SHOWN = 50  # problems printed; all are counted
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True, kw_only=True)
class Group:
    """One valid manifest line, with the exact bytes that will be signed and sent."""

    name: str
    line: int
    body: bytes = field(repr=False)  # canonical JSON: Name, ProjectName, Tags (if any)
    fingerprint: str  # sha256 of body: changes exactly when what we would send changes

    @property
    def payload(self) -> dict[str, Any]:
        loaded: dict[str, Any] = orjson.loads(self.body)
        return loaded


@dataclass(frozen=True, slots=True, kw_only=True)
class Invalid:
    line: int
    name: str | None
    problem: Problem


@dataclass(frozen=True, slots=True, kw_only=True)
class Scan:
    """What the validation pass learnt about the whole file."""

    path: Path
    sha256: str
    groups: int  # valid lines
    invalid: dict[int, Problem]  # line -> its first problem (every invalid line)
    problems: list[Problem]  # every problem, capped at MAX_SHOWN
    problem_count: int


def scan(path: Path) -> Scan:
    """Validate every line. Raises ManifestError for a file that cannot be read at all."""
    digest = hashlib.sha256()
    first_line: dict[str, int] = {}
    invalid: dict[int, Problem] = {}
    shown: list[Problem] = []
    count = groups = 0
    for lineno, raw in _lines(path, digest):
        result = _parse(path, lineno, raw)
        if isinstance(result, Group):
            seen = first_line.setdefault(result.name, lineno)
            if seen == lineno:
                groups += 1
                continue
            result = [Problem(str(path), lineno, "Name",
                              f"{result.name!r} is already given on line {seen}")]
        if result is None:
            continue
        invalid[lineno] = result[0]
        count += len(result)
        shown.extend(result[: max(0, MAX_SHOWN - len(shown))])
    if groups == 0 and not invalid:
        raise ManifestError([Problem(str(path), 0, "", "the manifest holds no groups "
                                     "(it is empty or has only blank lines)")], 1)
    return Scan(path=path, sha256=digest.hexdigest(), groups=groups, invalid=invalid,
                problems=shown, problem_count=count)


def read(scanned: Scan) -> Iterator[Group | Invalid]:
    """Stream the file again: each non-blank line as a Group, or as Invalid if `scan` said so."""
    for lineno, raw in _lines(scanned.path, None):
        if (problem := scanned.invalid.get(lineno)) is not None:
            yield Invalid(line=lineno, name=_name_of(raw), problem=problem)
            continue
        result = _parse(scanned.path, lineno, raw)
        if isinstance(result, Group):
            yield result
        elif result is not None:  # the file changed under us between the two passes
            raise ManifestError([Problem(str(scanned.path), lineno, "",
                                         "the file changed while the run was reading it")], 1)


def _lines(path: Path, digest: Any) -> Iterator[tuple[int, bytes]]:
    try:
        f = path.open("rb")
    except IsADirectoryError:
        raise ManifestError([Problem(str(path), 0, "", "is a directory, not a file")], 1) from None
    except FileNotFoundError:
        raise ManifestError([Problem(str(path), 0, "", "no such file")], 1) from None
    except OSError as exc:
        raise ManifestError([Problem(str(path), 0, "", f"cannot open it: {exc.strerror}")],
                            1) from None
    with f:
        lineno = 0
        while True:
            try:
                raw = f.readline(MAX_LINE_BYTES + 1)
            except OSError as exc:
                raise ManifestError([Problem(str(path), 0, "", f"cannot read it: {exc.strerror}")],
                                    1) from None
            if not raw:
                return
            lineno += 1
            if digest is not None:
                digest.update(raw)
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := f.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                    if digest is not None:
                        digest.update(rest)
                if digest is not None:
                    digest.update(rest)
                yield lineno, b""  # marks "too long"; _parse cannot see an empty line here
                continue
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            yield lineno, raw.rstrip(b"\r\n") or b" "


def _parse(path: Path, lineno: int, raw: bytes) -> Group | list[Problem] | None:
    """A Group, the line's problems, or None for a blank line."""
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
        return problem("line", f"must be a JSON object, not {api.json_type(obj)}")
    problems = [Problem(where, lineno, k, "unknown field (allowed: Name, ProjectName, Tags)")
                for k in sorted(set(obj) - api.CREATE_FIELDS)]
    name = obj.get("Name")
    if "Name" not in obj:
        problems.append(Problem(where, lineno, "Name", "is required"))
    elif (reason := api.name_problem(name)) is not None:
        problems.append(Problem(where, lineno, "Name", reason))
    project = obj.get("ProjectName", api.DEFAULT_PROJECT)
    if not isinstance(project, str):
        problems.append(Problem(where, lineno, "ProjectName",
                                f"must be a string, not {api.json_type(project)}"))
    elif not project:
        problems.append(Problem(where, lineno, "ProjectName",
                                "must not be empty (leave it out for 'default')"))
    tags = obj.get("Tags", [])
    problems.extend(Problem(where, lineno, f, r) for f, r in api.tags_problems(tags))
    if problems:
        return problems
    assert isinstance(name, str)
    return _group(name, project, tags, lineno)


def _group(name: str, project: str, tags: list[dict[str, str]], lineno: int) -> Group:
    body: dict[str, Any] = {"Name": name, "ProjectName": project}
    if tags:
        body["Tags"] = [{"Key": t["Key"], "Value": t["Value"], "Category": t["Category"]}
                        for t in tags]
    encoded = orjson.dumps(body)
    return Group(name=name, line=lineno, body=encoded,
                 fingerprint=hashlib.sha256(encoded).hexdigest())


def _name_of(raw: bytes) -> str | None:
    """The Name of an invalid line, if it has a usable one (for the ledger and report)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    name = obj.get("Name") if isinstance(obj, dict) else None
    return name if isinstance(name, str) and len(name) <= 200 else None
