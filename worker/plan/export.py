"""Export step: the listed account as a manifest. Pure.

One line per group, sorted by Name, in exactly the form `worker validate` accepts and
`worker run`/`sync` send: {"Name", "ProjectName", "Tags"} with Tags left out when there are
none. Tags are written once each, sorted by (Key, Value, Category): the API compares them as
a set, so this order and the dropping of repeats lose nothing, and the same account always
exports the same bytes (a backup can be diffed).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import orjson

from worker.api.account import Listed


def export_lines(groups: Iterable[Listed], projects: frozenset[str] | None = None) -> list[bytes]:
    """Manifest lines, each ending in a newline; only `projects` when given (None: all)."""
    chosen = [g for g in groups if projects is None or g.project in projects]
    chosen.sort(key=lambda g: g.name)
    return [manifest_line(g) for g in chosen]


def stream_lines(
    sorted_groups: Iterable[Listed], projects: frozenset[str] | None = None
) -> Iterator[bytes]:
    """`export_lines` for groups already in Name order (a ListedStore's `values()`), one at a
    time: an export of 10^6 groups holds one line, not the whole manifest."""
    for group in sorted_groups:
        if projects is None or group.project in projects:
            yield manifest_line(group)


def manifest_line(group: Listed) -> bytes:
    body: dict[str, Any] = {"Name": group.name, "ProjectName": group.project}
    if group.tags:
        body["Tags"] = [{"Key": k, "Value": v, "Category": c} for k, v, c in sorted(group.tag_set)]
    return orjson.dumps(body, option=orjson.OPT_APPEND_NEWLINE)
