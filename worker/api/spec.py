"""The Live OpenAPI contract for pull-to-push groups: endpoint, actions, Name and tag rules.

Facts only (no I/O), and the helpers that word a bad value for a message: the manifest
check, the listing check and the sandbox's request validation all read the rules from here,
so they can never drift apart. The facts in our own words, with their sources: docs/api.md.
"""

from __future__ import annotations

import re
from typing import Final

VERSION: Final = "2023-01-01"
SERVICE: Final = "live"
DEFAULT_REGION: Final = "cn-north-1"
DEFAULT_ENDPOINT: Final = "https://live.volcengineapi.com"
DEFAULT_PROJECT: Final = "default"
DOCUMENTED_RATE: Final = 10  # requests per second per account, on each group action

CREATE: Final = "CreatePullToPushGroup"
LIST: Final = "ListPullToPushGroup"
UPDATE: Final = "UpdatePullToPushGroup"
DELETE: Final = "DeletePullToPushGroup"
GROUP_ACTIONS: Final = frozenset({CREATE, LIST, UPDATE, DELETE})

# Error codes whose meaning a reader of the ledger needs too (api/classify.py has the rest):
# HTTP 429 with this code means "already created", not "slow down".
EXISTS: Final = "RequestLimitExceeded.Exist"
NOT_FOUND: Final = "ResourceNotFound"  # update/delete of a Name the account does not hold

NAME_MAX: Final = 20
# "Chinese characters, A-Z, a-z, 0-9". The Live API's Chinese class is exactly U+4E00-U+9FA5
# (the GB-era CJK Unified Ideographs): it refuses Extension A (U+3400-U+4DBF) and the later
# additions U+9FA6-U+9FFF, so we do too. The sandbox imports this same rule. ASCII letters and
# digits only: re's [A-Za-z0-9] does not match full-width or other scripts' digits.
_NAME_RE: Final = re.compile(r"[A-Za-z0-9\u4e00-\u9fa5]+")
TAG_CATEGORIES: Final = ("System", "Custom")
TAG_FIELDS: Final = frozenset({"Key", "Value", "Category"})
CREATE_FIELDS: Final = frozenset({"Name", "ProjectName", "Tags"})


def name_problem(name: object) -> str | None:
    """Why `name` is not a valid group Name, or None when it is."""
    if not isinstance(name, str):
        return f"must be a string, not {json_type(name)}"
    if not name:
        return "must not be empty"
    if len(name) > NAME_MAX:
        return f"is {len(name)} characters long; at most {NAME_MAX} are allowed"
    if not _NAME_RE.fullmatch(name):
        bad = next(c for c in name if not _NAME_RE.fullmatch(c))
        return (
            f"may hold only Chinese characters, letters and digits; {bad!r} "
            f"(U+{ord(bad):04X}) is not one (allowed: U+4E00-U+9FA5, A-Z, a-z, 0-9)"
        )
    return None


def tags_problems(tags: object) -> list[tuple[str, str]]:
    """(field, reason) for each problem of a Tags value; empty when it is valid."""
    if not isinstance(tags, list):
        return [("Tags", f"must be a list of objects, not {json_type(tags)}")]
    problems: list[tuple[str, str]] = []
    for i, tag in enumerate(tags):
        where = f"Tags[{i}]"
        if not isinstance(tag, dict):
            problems.append((where, f"must be an object, not {json_type(tag)}"))
            continue
        for key in sorted(set(tag) - TAG_FIELDS):
            problems.append(
                (f"{where}.{label(key)}", "unknown field (allowed: Key, Value, Category)")
            )
        for key in ("Key", "Value"):
            if key not in tag:
                problems.append((f"{where}.{key}", "is required"))
            elif not isinstance(tag[key], str):
                problems.append((f"{where}.{key}", f"must be a string, not {json_type(tag[key])}"))
        category = tag.get("Category")
        if category not in TAG_CATEGORIES:
            problems.append(
                (f"{where}.Category", f"must be 'System' or 'Custom', not {shown(category)}")
            )
    return problems


def shown(value: object, limit: int = 40) -> str:
    """A manifest value fit for a message: its repr, bounded (a value may hold terminal
    escapes or be a megabyte long)."""
    text = repr(value[:limit] if isinstance(value, str) else value)
    return text if len(text) <= limit + 2 else text[:limit] + "..."


def label(key: str) -> str:
    """A manifest key fit for the FIELD part of a message: as it is when short and plain."""
    return key if key.isprintable() and 0 < len(key) <= 40 else shown(key)


def json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for messages a user can act on."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
