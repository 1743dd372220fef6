"""Where a sandbox's account comes from and goes: a preload manifest (the worker's JSONL
format) and the state file that keeps the account and its keys between runs."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final

import orjson

from worker.api import spec
from worker.errors import UsageError

FORMAT: Final = "worker-sandbox-state"
VERSION: Final = 1
MAX_LINE_BYTES: Final = 1 << 20  # as the manifest reader: a longer line is a mistake
MAX_STATE_BYTES: Final = 256 << 20  # ~1 million groups; more is not a sandbox's job
_BOM: Final = b"\xef\xbb\xbf"
_COUNTERS: Final = ("created", "updated", "deleted", "exist_answers", "requests")


@dataclass(frozen=True, slots=True, kw_only=True)
class Stored:
    """One group as kept on disk: what List shows plus the counters tests judge by."""

    name: str
    project: str
    tags: list[dict[str, str]]
    status: int = 0
    created: int = 0
    updated: int = 0
    deleted: int = 0
    exist_answers: int = 0
    requests: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class State:
    keys: dict[str, str] = field(repr=False)
    groups: list[Stored]


def read_preload(path: Path) -> list[Stored]:
    """The groups of a manifest file, available and with every counter 0. The first bad
    line is an error naming FILE:LINE."""
    groups: list[Stored] = []
    seen: dict[str, int] = {}
    with _open_regular(path) as f:
        for lineno, raw in enumerate(_lines(f, path), start=1):
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            group = _preload_line(path, lineno, raw)
            if (first := seen.setdefault(group.name, lineno)) != lineno:
                raise UsageError(
                    f"{path}:{lineno}: Name: {group.name!r} is already given on line {first}"
                )
            groups.append(group)
    return groups


def read_state(path: Path) -> State | None:
    """The state saved by an earlier run, or None when there is no file yet. Anything that
    is not a state file we wrote is refused, untouched."""
    try:
        f = _open_regular(path)
    except FileNotFoundError:
        return None
    with f:
        data = f.read(MAX_STATE_BYTES + 1)
    if len(data) > MAX_STATE_BYTES:
        raise _not_ours(path, f"larger than {MAX_STATE_BYTES >> 20} MiB")
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise _not_ours(path, "not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _not_ours(path, f'no "format": "{FORMAT}"')
    if doc.get("version") != VERSION:
        raise _not_ours(path, f"version {doc.get('version')!r}; this sandbox reads {VERSION}")
    keys, groups = doc.get("keys"), doc.get("groups")
    if not (
        isinstance(keys, dict)
        and all(isinstance(k, str) and k and isinstance(v, str) and v for k, v in keys.items())
    ):
        raise _not_ours(path, '"keys" must map access keys to secrets')
    if not isinstance(groups, list):
        raise _not_ours(path, '"groups" must be a list')
    stored: list[Stored] = []
    names: set[str] = set()
    for i, g in enumerate(groups):
        problem = _state_group_problem(g)
        if problem is None and g["Name"] in names:
            problem = "a Name given twice"
        if problem is not None:
            raise _not_ours(path, f"groups[{i}]: {problem}")
        names.add(g["Name"])
        stored.append(
            Stored(
                name=g["Name"],
                project=g["ProjectName"],
                tags=g["Tags"],
                status=g["Status"],
                **{c: g[c] for c in _COUNTERS},
            )
        )
    return State(keys=dict(keys), groups=stored)


def write_state(path: Path, state: State) -> None:
    """Atomically: a private temp file beside it, fsynced, then renamed over it. The file
    holds secret keys, so it is created readable by its owner only."""
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "keys": state.keys,
        "groups": [
            {
                "Name": g.name,
                "ProjectName": g.project,
                "Tags": g.tags,
                "Status": g.status,
                **{c: getattr(g, c) for c in _COUNTERS},
            }
            for g in state.groups
        ],
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UsageError(
            f"cannot save the sandbox state to {path}: {exc.strerror or exc}"
        ) from None


def check_writable(path: Path) -> None:
    """Refuse at start a state file that could not be saved at stop: a missing folder, or
    a path that is not a regular file."""
    if not path.parent.is_dir():
        raise UsageError(f"--state-file {path}: the folder {path.parent} does not exist")
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(path.stat().st_mode):
            raise UsageError(f"--state-file {path}: not a regular file")


def _preload_line(path: Path, lineno: int, raw: bytes) -> Stored:
    def bad(field_name: str, reason: str) -> UsageError:
        return UsageError(f"{path}:{lineno}: {field_name}: {reason}")

    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad("line", "not valid JSON") from None
    if not isinstance(body, dict):
        raise bad("line", f"must be a JSON object, not {spec.json_type(body)}")
    if unknown := sorted(set(body) - spec.CREATE_FIELDS):
        raise bad(unknown[0], "unknown field (allowed: Name, ProjectName, Tags)")
    if "Name" not in body:
        raise bad("Name", "is required")
    if (problem := spec.name_problem(body["Name"])) is not None:
        raise bad("Name", problem)
    project = body.get("ProjectName", spec.DEFAULT_PROJECT)
    if not isinstance(project, str) or not project:
        raise bad("ProjectName", "must be a non-empty string")
    tags = body.get("Tags", [])
    if problems := spec.tags_problems(tags):
        raise bad(*problems[0])
    return Stored(
        name=body["Name"],
        project=project,
        tags=[{"Key": t["Key"], "Value": t["Value"], "Category": t["Category"]} for t in tags],
    )


def _state_group_problem(g: object) -> str | None:
    if not isinstance(g, dict):
        return "not an object"
    if spec.name_problem(g.get("Name")) is not None:
        return "a bad Name"
    if not isinstance(g.get("ProjectName"), str) or not g["ProjectName"]:
        return "a bad ProjectName"
    if spec.tags_problems(g.get("Tags")):
        return "bad Tags"
    if g.get("Status") not in (0, 1) or isinstance(g.get("Status"), bool):
        return "a Status other than 0 or 1"
    for c in _COUNTERS:
        value: Any = g.get(c)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{c} is not a count"
    return None


def _not_ours(path: Path, reason: str) -> UsageError:
    return UsageError(
        f"{path} is not a sandbox state file ({reason}); it was left as it is: "
        f"move it away or name another --state-file"
    )


def _open_regular(path: Path) -> BinaryIO:
    # O_NONBLOCK: opening a FIFO must not wait for a writer before we can refuse it.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"{path}: not a regular file")
    return os.fdopen(fd, "rb")


def _lines(f: BinaryIO, path: Path) -> Iterator[bytes]:
    lineno = 0
    while raw := f.readline(MAX_LINE_BYTES + 1):
        lineno += 1
        if len(raw) > MAX_LINE_BYTES:
            raise UsageError(f"{path}:{lineno}: line: longer than {MAX_LINE_BYTES} bytes")
        yield raw


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
