"""One group as List shows it (account.py parses pages into these; listed_store.py keeps them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, TypeVar

SHARE_LIMIT: Final = 1 << 16  # distinct values an Interner keeps one copy of
RAW_LIMIT: Final = 1 << 12  # encoded forms it remembers the decoded value of
_T = TypeVar("_T")

# (Key, Value, Category): compared as a set, since tag order means nothing to the API.
Tag = tuple[str, str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class Listed:
    """One available group as List shows it.

    `tags` keeps the listed order (export sorts it); compare with `tag_set`. The set is
    derived on demand rather than stored: a frozenset costs 216 bytes even when empty, more
    than the rest of the entry.
    """

    name: str
    project: str
    tags: tuple[Tag, ...] = ()

    @property
    def tag_set(self) -> frozenset[Tag]:
        return frozenset(self.tags)


class Interner:
    """Hands out one shared copy of each equal value: projects, tag keys, tags and whole tag
    lists repeat across thousands of groups, and JSON decoding makes a new object for each.
    At most `limit` distinct values are kept, so values that never repeat (a tag per group)
    cost no more than they would unshared."""

    def __init__(self, limit: int = SHARE_LIMIT) -> None:
        self._table: dict[Any, Any] = {}
        self._raw: dict[bytes, Any] = {}  # encoded form -> the shared decoded value
        self._limit = limit

    def __len__(self) -> int:
        return len(self._table)

    def __call__(self, value: _T) -> _T:
        found: _T | None = self._table.get(value)
        if found is not None:
            return found
        if len(self._table) < self._limit:
            self._table[value] = value
        return value

    def known(self, raw: bytes) -> Any:
        """The shared value remembered for the encoded form `raw`, or None."""
        return self._raw.get(raw)

    def remember(self, raw: bytes, value: Any) -> None:
        """Remember `value` as what `raw` decodes to (at most RAW_LIMIT encoded forms: a
        tag list per group never repeats, and then this costs no more than that)."""
        if len(self._raw) < RAW_LIMIT:
            self._raw[raw] = value
