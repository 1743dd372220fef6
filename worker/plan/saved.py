"""Saved plans (sync): the plan a person reviewed, written to a file, read back and compared.

`worker sync MANIFEST --dry-run --plan-out PLAN` writes `Saved` (docs/saved-plans.md: the
format, version 1); `worker sync --plan PLAN` lists the account, plans again and carries the
plan out only when `differences(saved, fresh)` is empty. The file is ours when written and
untrusted when read: bounded size, one strict schema, a version check, and every message
names the file and the field. It holds no secret: the endpoint is redacted, the access key
id is not a secret (it is in every ledger header too).

What is compared is everything that shapes the writes: the target, the manifest's sha256,
the plan options, and every change with the account state it was planned from. Kept extras
(outside the scope, or no --prune) are only counted: a group nobody plans to touch that
moves does not make a plan stale.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, assert_never

import orjson

from worker.api.account import Listed, Tag
from worker.errors import UsageError
from worker.ledger.records import Target
from worker.plan import reconcile
from worker.userpaths import shown_path

FORMAT: Final = "worker-sync-plan"
VERSION: Final = 1
MAX_PLAN_BYTES: Final = 64 << 20  # about 300 000 changes; a plan file is never streamed
KINDS: Final = ("create", "update", "conflict", "delete", "replace")
SHOWN: Final = 5  # Names a stale message lists per difference

# The schema: a dict is an object with exactly these keys, [x] a list of x, a tuple any of
# its members, None the JSON null.
_TAG: Final = {"Key": str, "Value": str, "Category": str}
_STATE: Final = {"ProjectName": str, "Tags": [_TAG]}
_ENTRY: Final[dict[str, object]] = {
    "create": {"Name": str, "ProjectName": str, "line": int, "from": None},
    "update": {"Name": str, "line": int, "from": _STATE, "added": [_TAG], "removed": [_TAG]},
    "conflict": {"Name": str, "line": int, "manifest_project": str, "from": _STATE},
    "delete": {"Name": str, "from": _STATE},
    "replace": {"Name": str, "line": int, "manifest_project": str, "from": _STATE},
}
_SCHEMA: Final = {
    "format": str,
    "version": int,
    "created": str,
    "target": {"endpoint": str, "region": str, "access_key": str},
    "manifest": {"path": str, "sha256": str},
    "options": {
        "prune": bool,
        "scope_projects": [str],
        "scope_match": (str, None),
        "max_delete": int,
        "replace_conflicts": bool,
    },
    "counts": {
        k: int for k in ("create", "update", "conflict", "delete", "replace", "keep", "in_sync")
    },
    "changes": {kind: [entry] for kind, entry in _ENTRY.items()},
}


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanOptions:
    """The options that shape a plan."""

    prune: bool
    scope_projects: tuple[str, ...]
    scope_match: str | None
    max_delete: int
    replace_conflicts: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "prune": self.prune,
            "scope_projects": sorted(self.scope_projects),
            "scope_match": self.scope_match,
            "max_delete": self.max_delete,
            "replace_conflicts": self.replace_conflicts,
        }


Changes = dict[str, dict[str, dict[str, Any]]]  # kind -> Name -> entry


@dataclass(frozen=True, slots=True, kw_only=True)
class Saved:
    """One plan, as written to and read from a plan file."""

    created: str
    target: Target
    manifest_path: str
    manifest_sha256: str
    options: PlanOptions
    counts: dict[str, int]
    changes: Changes

    def as_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "created": self.created,
            "target": {
                "endpoint": self.target.endpoint,
                "region": self.target.region,
                "access_key": self.target.access_key,
            },
            "manifest": {"path": self.manifest_path, "sha256": self.manifest_sha256},
            "options": self.options.as_json(),
            "counts": self.counts,
            "changes": {kind: list(self.changes[kind].values()) for kind in KINDS},
        }


def changes_of(changes: Iterable[reconcile.Change]) -> Changes:
    """Every change the plan would carry out, by kind and Name, with the state it was
    planned from (in-sync groups and kept extras are not changes)."""
    out: Changes = {kind: {} for kind in KINDS}
    for change in changes:
        match change:
            case reconcile.Create(group):
                project = str(reconcile.group_payload(group)["ProjectName"])
                out["create"][group.name] = {
                    "Name": group.name,
                    "ProjectName": project,
                    "line": group.line,
                    "from": None,
                }
            case reconcile.Update(group, listed, added, removed):
                out["update"][group.name] = {
                    "Name": group.name,
                    "line": group.line,
                    "from": _state(listed),
                    "added": [_tag(t) for t in added],
                    "removed": [_tag(t) for t in removed],
                }
            case reconcile.Conflict(group, listed):
                out["conflict"][group.name] = {
                    "Name": group.name,
                    "line": group.line,
                    "manifest_project": change.manifest_project,
                    "from": _state(listed),
                }
            case reconcile.Replace(group, listed):
                out["replace"][group.name] = {
                    "Name": group.name,
                    "line": group.line,
                    "manifest_project": change.manifest_project,
                    "from": _state(listed),
                }
            case reconcile.Delete(listed):
                out["delete"][listed.name] = {"Name": listed.name, "from": _state(listed)}
            case reconcile.InSync() | reconcile.Keep():
                pass
            case _:
                assert_never(change)
    return out


def _state(listed: Listed) -> dict[str, Any]:
    return {"ProjectName": listed.project, "Tags": [_tag(t) for t in sorted(listed.tag_set)]}


def _tag(tag: Tag) -> dict[str, str]:
    return {"Key": tag[0], "Value": tag[1], "Category": tag[2]}


# -- compare --------------------------------------------------------------------------------

_NOUNS: Final = {
    "create": ("group to create", "groups to create"),
    "update": ("group to update", "groups to update"),
    "conflict": ("group in conflict", "groups in conflict"),
    "delete": ("extra in scope", "extras in scope"),
    "replace": ("group to replace", "groups to replace"),
}


def differences(saved: Saved, fresh: Saved) -> Iterator[str]:
    """What differs between the reviewed plan and the plan made now, most telling first:
    the target, the options, the manifest, then each kind's new, gone and moved changes."""
    if saved.target != fresh.target:
        yield f"another target: {fresh.target} (the plan's: {saved.target})"
    old, new = saved.options.as_json(), fresh.options.as_json()
    for key in old:
        if old[key] != new[key]:
            flag = "--" + key.replace("_", "-").replace("-projects", "-project")
            yield f"another option {flag}: {_json(new[key])} (the plan's: {_json(old[key])})"
    if saved.manifest_sha256 != fresh.manifest_sha256:
        yield (
            f"the manifest {shown_path(Path(saved.manifest_path))} changed (sha256 "
            f"{saved.manifest_sha256[:12]}… when planned, {fresh.manifest_sha256[:12]}… now)"
        )
    for kind in KINDS:
        before, now = saved.changes[kind], fresh.changes[kind]
        one, many = _NOUNS[kind]
        added = [n for n in now if n not in before]
        gone = [n for n in before if n not in now]
        moved = [n for n in now if n in before and now[n] != before[n]]
        for names, what in (
            (added, "new {noun}"),
            (gone, "{noun} no longer planned"),
            (moved, "{noun} whose account state changed"),
        ):
            if names:
                noun = one if len(names) == 1 else many
                yield f"{len(names)} {what.format(noun=noun)}: {_names(names)}"


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown if len(names) <= SHOWN else f"{shown} and {len(names) - SHOWN} more"


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


# -- the file -------------------------------------------------------------------------------


def write(path: Path, saved: Saved) -> None:
    """Atomically, mode 0600: a reader sees the old file or the whole new one, never part."""
    data = orjson.dumps(saved.as_json(), option=orjson.OPT_INDENT_2) + b"\n"
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise UsageError(f"--plan-out {shown_path(path)}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:  # mkstemp makes it 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with _quiet():
            os.unlink(tmp)
        raise UsageError(f"--plan-out {shown_path(path)}: {exc.strerror or exc}") from None


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return isinstance(exc[1], OSError)


def read(path: Path) -> Saved:
    """The plan file at `path`, checked; a UsageError naming the file and the field."""
    where = f"--plan {shown_path(path)}"
    try:
        with path.open("rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_PLAN_BYTES:
                raise UsageError(f"{where}: larger than {MAX_PLAN_BYTES >> 20} MiB: not a plan")
            data = f.read(MAX_PLAN_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"{where}: cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_PLAN_BYTES:  # grew while read, or not a regular file
        raise UsageError(f"{where}: larger than {MAX_PLAN_BYTES >> 20} MiB: not a plan")
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"{where}: not JSON ({exc}): not a plan file") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UsageError(f"{where}: format: not a worker sync plan (want {FORMAT!r})")
    if doc.get("version") != VERSION:
        raise UsageError(
            f"{where}: version: {_json(doc.get('version'))} is not a version this worker "
            f"reads ({VERSION}); make a new plan with this worker"
        )
    _check(doc, _SCHEMA, where, "")
    return _saved(doc, where)


def _saved(doc: Mapping[str, Any], where: str) -> Saved:
    sha = doc["manifest"]["sha256"]
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise UsageError(f"{where}: manifest.sha256: not a sha256 hex digest")
    changes: Changes = {}
    for kind in KINDS:
        by_name: dict[str, dict[str, Any]] = {}
        for i, entry in enumerate(doc["changes"][kind]):
            if entry["Name"] in by_name:
                raise UsageError(f"{where}: changes.{kind}[{i}].Name: given twice")
            by_name[entry["Name"]] = entry
        changes[kind] = by_name
    o = doc["options"]
    return Saved(
        created=doc["created"],
        target=Target(**doc["target"]),
        manifest_path=doc["manifest"]["path"],
        manifest_sha256=sha,
        options=PlanOptions(
            prune=o["prune"],
            scope_projects=tuple(o["scope_projects"]),
            scope_match=o["scope_match"],
            max_delete=o["max_delete"],
            replace_conflicts=o["replace_conflicts"],
        ),
        counts=dict(doc["counts"]),
        changes=changes,
    )


def _check(value: object, schema: object, where: str, at: str) -> None:
    """`value` has exactly the shape `schema` draws (see _SCHEMA), else a UsageError."""
    here = at or "the top level"
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise UsageError(f"{where}: {here}: must be an object")
        for key in value.keys() - schema.keys():
            raise UsageError(f"{where}: {_at(at, key)}: not a field of a plan (version 1)")
        for key, inner in schema.items():
            if key not in value:
                raise UsageError(f"{where}: {_at(at, key)}: missing")
            _check(value[key], inner, where, _at(at, key))
    elif isinstance(schema, list):
        if not isinstance(value, list):
            raise UsageError(f"{where}: {here}: must be a list")
        for i, item in enumerate(value):
            _check(item, schema[0], where, f"{at}[{i}]")
    elif isinstance(schema, tuple):
        if not any(_is(value, s) for s in schema):
            raise UsageError(f"{where}: {here}: must be {_kinds(schema)}")
    elif not _is(value, schema):
        raise UsageError(f"{where}: {here}: must be {_kinds((schema,))}")


def _is(value: object, schema: object) -> bool:
    if schema is None:
        return value is None
    if schema is int:
        return isinstance(value, int) and not isinstance(value, bool)
    assert isinstance(schema, type)
    return isinstance(value, schema)


def _kinds(schema: tuple[object, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", None: "null"}
    return " or ".join(names.get(s, str(s)) for s in schema)  # type: ignore[call-overload]


def _at(at: str, key: str) -> str:
    return f"{at}.{key}" if at else key
