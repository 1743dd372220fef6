"""The sync plan as people and programs read it: text (`render_text`) and one JSON object
(`render_json`), from a SyncPlan and its changes (reconcile.iter_changes). Pure."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, assert_never

import orjson

from worker.api.account import Tag
from worker.plan.reconcile import (
    NO_PRUNE,
    Change,
    Conflict,
    Create,
    Delete,
    InSync,
    Keep,
    Replace,
    SyncPlan,
    Update,
    group_payload,
)


def render_text(
    plan: SyncPlan, changes: Iterable[Change], *, list_kept: bool = False
) -> Iterator[str]:
    """The plan for people: counts, then one line per change (in-sync groups are counted only).

    `+ name` create, `~ name` update with the tag difference, `! name` project conflict,
    `-/+ name` replace (delete, then create in the manifest's project), `- name` delete.
    Kept extras are counted in one `?` line: they are every group outside the scope, the
    same thousands every night; `list_kept` (-v) gives each its `? name` line.
    """
    c = plan.counts
    invalid = f", {c['invalid']} invalid lines" if c["invalid"] else ""
    # Said only when there is one: a sync without --replace-conflicts reads as before.
    replace = f"{c['replace']} to replace, " if c["replace"] else ""
    yield (
        f"sync plan: {c['create']} to create, {c['update']} to update, "
        f"{c['conflict']} in conflict, {replace}{c['delete']} to delete, {c['keep']} extra kept, "
        f"{c['in_sync']} in sync ({c['listed']} listed{invalid})"
    )
    for change in changes:
        match change:
            case Create(group):
                yield f"+ {group.name}"
            case Update(group, _, added, removed):
                diff = [f"+{_tag_text(t)}" for t in added] + [f"-{_tag_text(t)}" for t in removed]
                yield f"~ {group.name}  tags: {', '.join(diff)}"
            case Conflict(group, listed):
                yield (
                    f"! {group.name}  project: manifest {_text(change.manifest_project)}, "
                    f"account {_text(listed.project)} (a project cannot be changed)"
                )
            case Replace(group, listed):
                yield (
                    f"-/+ {group.name}  project: {_text(listed.project)} → "
                    f"{_text(change.manifest_project)}"
                )
            case InSync():
                pass
            case Delete(listed):
                yield f"- {listed.name}  (project {_text(listed.project)})"
            case Keep(listed, why):
                if list_kept:
                    yield f"? {listed.name}  (project {_text(listed.project)}) {why}"
            case _:
                assert_never(change)
    if plan.kept and not list_kept:
        n = plan.kept
        yield f"? {n} {'extra' if n == 1 else 'extras'} {plan.keep_why} (-v lists them)"


def render_json(plan: SyncPlan, changes: Iterable[Change]) -> dict[str, Any]:
    """The plan as one JSON object: counts, then a list per kind of change."""
    out: dict[str, Any] = {
        "prune": plan.prune,
        "counts": plan.counts,
        "create": [],
        "update": [],
        "conflict": [],
        "replace": [],
        "delete": [],
        "keep": [],
    }
    for change in changes:
        match change:
            case Create(group):
                out["create"].append(
                    {"Name": group.name, "ProjectName": group_payload(group)["ProjectName"]}
                )
            case Update(group, listed, added, removed):
                out["update"].append(
                    {
                        "Name": group.name,
                        "ProjectName": listed.project,
                        "added": [_tag_json(t) for t in added],
                        "removed": [_tag_json(t) for t in removed],
                    }
                )
            case Conflict(group, listed):
                out["conflict"].append(
                    {
                        "Name": group.name,
                        "manifest_project": change.manifest_project,
                        "account_project": listed.project,
                    }
                )
            case Replace(group, listed):
                out["replace"].append(
                    {
                        "Name": group.name,
                        "manifest_project": change.manifest_project,
                        "account_project": listed.project,
                    }
                )
            case InSync():
                pass
            case Delete(listed):
                out["delete"].append({"Name": listed.name, "ProjectName": listed.project})
            case Keep(listed, why):
                out["keep"].append(
                    {
                        "Name": listed.name,
                        "ProjectName": listed.project,
                        "why": "no_prune" if why == NO_PRUNE else "out_of_scope",
                    }
                )
            case _:
                assert_never(change)
    return out


def _tag_json(tag: Tag) -> dict[str, str]:
    return {"Key": tag[0], "Value": tag[1], "Category": tag[2]}


def _tag_text(tag: Tag) -> str:
    return f"{_text(tag[0])}={_text(tag[1])}/{tag[2]}"


def _text(s: str) -> str:
    """`s` as is when it reads unambiguously on one line; else JSON-quoted (escapes shown)."""
    if s and s.isprintable() and not any(ch in s for ch in " =,/()\"'"):
        return s
    return orjson.dumps(s).decode()
