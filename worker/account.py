"""Account step (sync): what `ListPullToPushGroup` says the account holds. Pure.

`parse_page` checks one List `Result` strictly and turns it into `Listed` values;
`Listing` is the paging state machine that says which page to ask for next and decides,
from `Total` and the Names seen, whether the pages add up to one consistent picture of the
account. The API promises no order and no stability while paging, so a listing whose pages do
not add up (Total moved, a Name seen twice, a short or long page) is thrown away whole and
started again, a bounded number of times. A partial listing is never handed out: planning
deletes from one would delete what merely was not seen.

The I/O is `commands.sync.list_account`'s, through the runner:

    listing = Listing()
    while (body := listing.next_request()) is not None:
        result = await runner.read(api.LIST, orjson.dumps(body))  # paced, retried
        listing.add_result(result)          # parse_page + add
    account = listing.groups                # complete and consistent
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from worker import api
from worker.errors import ListingFailed

PAGE_SIZE: Final = 1000  # the API's maximum: one request lists a thousand groups
MAX_PAGES: Final = 1000  # PageNum is 1-1000: past page 1000 a group cannot be listed at all
MAX_RESTARTS: Final = 5  # listings thrown away because the account moved, before giving up
AVAILABLE: Final = 0  # Status / StatusList value of a group that is not deleted

SHARE_LIMIT: Final = 1 << 16  # distinct values an Interner keeps one copy of

# (Key, Value, Category): compared as a set, since tag order means nothing to the API.
Tag = tuple[str, str, str]
_T = TypeVar("_T")


class ListingError(ListingFailed):
    """The account could not be listed completely and consistently (exit 3: nothing written)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Listed:
    """One available group as List shows it.

    `tags` keeps the listed order (export sorts it); compare with `tag_set`. The set is
    derived on demand rather than stored: a frozenset costs 216 bytes even when empty, more
    than the rest of the entry, and a listing of 10^6 groups is held in memory whole.
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


@dataclass(frozen=True, slots=True, kw_only=True)
class Page:
    items: list[Listed]
    total: int  # the account's count of available groups, as this page saw it


def parse_page(
    result: object, *, page_size: int = PAGE_SIZE, share: Interner | None = None
) -> Page:
    """Check a List `Result` ({"List": [...], "Total": n}) strictly; unknown fields are ignored.

    Raises ListingError naming the first thing wrong. `List: null` and `Tags: null` or a
    missing `Tags` are read as empty (a Go service renders an empty slice as null). `share`
    (a Listing passes its own) keeps one copy of values repeated across pages.
    """
    if not isinstance(result, dict):
        raise ListingError(f"List answered a Result that is {api.json_type(result)}, not an object")
    if "Total" not in result:
        raise ListingError("List answered without Result.Total")
    total = result["Total"]
    if not _is_int(total) or total < 0:
        raise ListingError(
            f"List answered Result.Total {_show(total)}: expected a whole number >= 0"
        )
    if "List" not in result:
        raise ListingError("List answered without Result.List")
    raw_items = result["List"]
    if raw_items is None:
        raw_items = []
    if not isinstance(raw_items, list):
        raise ListingError(f"List answered Result.List as {api.json_type(raw_items)}, not an array")
    if len(raw_items) > page_size:
        raise ListingError(
            f"List answered {len(raw_items)} groups on one page; PageSize was {page_size}"
        )
    share = share if share is not None else Interner()
    return Page(items=[_item(i, raw, share) for i, raw in enumerate(raw_items)], total=total)


def _item(i: int, raw: object, share: Interner) -> Listed:
    where = f"Result.List[{i}]"
    if not isinstance(raw, dict):
        raise ListingError(f"{where} is {api.json_type(raw)}, not an object")
    name = raw.get("Name")
    if (reason := api.name_problem(name)) is not None:
        raise ListingError(f"{where}.Name {reason}")
    assert isinstance(name, str)
    where = f"{where} ({name})"
    project = raw.get("ProjectName")
    if not isinstance(project, str) or not project:
        raise ListingError(f"{where}.ProjectName must be a non-empty string, not {_show(project)}")
    status = raw.get("Status")
    if not _is_int(status):
        raise ListingError(f"{where}.Status must be a whole number, not {_show(status)}")
    if status != AVAILABLE:
        # Planning on a deleted group as if it were there would never create it again.
        raise ListingError(
            f"{where}.Status is {status} in a listing of available groups "
            f"(StatusList [{AVAILABLE}])"
        )
    project = share(project)
    raw_tags = raw.get("Tags")
    if raw_tags is None:
        return Listed(name=name, project=project)
    if not isinstance(raw_tags, list):
        raise ListingError(f"{where}.Tags must be an array, not {api.json_type(raw_tags)}")
    return Listed(
        name=name,
        project=project,
        tags=share(tuple(_tag(f"{where}.Tags[{j}]", t, share) for j, t in enumerate(raw_tags))),
    )


def _tag(where: str, raw: object, share: Interner) -> Tag:
    if not isinstance(raw, dict):
        raise ListingError(f"{where} is {api.json_type(raw)}, not an object")
    key, value, category = raw.get("Key"), raw.get("Value"), raw.get("Category")
    if not isinstance(key, str):
        raise ListingError(f"{where}.Key must be a string, not {_show(key)}")
    if not isinstance(value, str):
        raise ListingError(f"{where}.Value must be a string, not {_show(value)}")
    if category not in api.TAG_CATEGORIES:
        raise ListingError(f"{where}.Category must be 'System' or 'Custom', not {_show(category)}")
    assert isinstance(category, str)
    return share((share(key), share(value), share(category)))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: object) -> str:
    """A decoded JSON value for a message: short, one line (the server's text is untrusted)."""
    text = repr(value) if isinstance(value, (str, int, float)) else api.json_type(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Listing:
    """Pages through List until the pages add up to one consistent account, or gives up.

    Invariant: `_groups` holds exactly the items of pages 1.._page of the current attempt,
    each Name once, and every page so far reported the same `_total`.
    """

    def __init__(self, *, page_size: int = PAGE_SIZE, max_restarts: int = MAX_RESTARTS) -> None:
        if not 1 <= page_size <= PAGE_SIZE:
            raise ValueError(f"page_size must be 1-{PAGE_SIZE}, not {page_size}")
        if max_restarts < 0:
            raise ValueError("max_restarts must be >= 0")
        self.page_size = page_size
        self.max_restarts = max_restarts
        self.restarts = 0  # attempts thrown away so far
        self.requests = 0  # List requests asked for, over all attempts
        self.last_restart: str | None = None  # why the last attempt was thrown away
        self._page = 0  # pages of the current attempt added so far
        self._pending = False  # a request was handed out and its page not added yet
        self._total: int | None = None
        self._groups: dict[str, Listed] = {}
        self._done = False
        self._share = Interner()  # one copy of repeated values, across pages and attempts

    def __repr__(self) -> str:
        return (
            f"<Listing page={self._page} collected={len(self._groups)} "
            f"total={self._total} restarts={self.restarts} done={self._done}>"
        )

    @property
    def done(self) -> bool:
        return self._done

    @property
    def groups(self) -> Mapping[str, Listed]:
        """Name -> Listed for the whole account. Only once `done`: never a partial listing."""
        if not self._done:
            raise RuntimeError("the listing is not complete")
        return self._groups

    def next_request(self) -> dict[str, Any] | None:
        """The next List body to send, or None when the listing is complete."""
        if self._done:
            return None
        if self._pending:
            raise RuntimeError("add() the page of the previous request first")
        self._pending = True
        self.requests += 1
        return {"PageNum": self._page + 1, "PageSize": self.page_size, "StatusList": [AVAILABLE]}

    def add_result(self, result: object) -> str | None:
        """`add(parse_page(result))` with this listing's page size."""
        return self.add(parse_page(result, page_size=self.page_size, share=self._share))

    def add(self, page: Page) -> str | None:
        """Take the answer to the last request. Returns why the listing starts over, if it does.

        Raises ListingError when the account cannot be listed: more groups than List can page
        through, or still moving after `max_restarts` fresh starts.
        """
        if not self._pending:
            raise RuntimeError("add() without a request from next_request()")
        self._pending = False
        if len(page.items) > self.page_size:
            raise ListingError(
                f"List answered {len(page.items)} groups on one page; PageSize was {self.page_size}"
            )
        limit = MAX_PAGES * self.page_size
        if page.total > limit:
            raise ListingError(
                f"the account holds {page.total} groups; List can page through at most "
                f"{limit} ({MAX_PAGES} pages of {self.page_size}), so it cannot be listed "
                "completely and sync will not plan from part of it"
            )
        self._page += 1
        if self._total is None:
            self._total = page.total
        elif page.total != self._total:
            return self._restart(
                f"Total changed from {self._total} to {page.total} "
                f"between pages (page {self._page})"
            )
        before = (self._page - 1) * self.page_size
        expected = max(0, min(self.page_size, self._total - before))
        if len(page.items) != expected:
            return self._restart(
                f"page {self._page} held {len(page.items)} groups where "
                f"Total {self._total} means {expected}"
            )
        for item in page.items:
            if item.name in self._groups:
                return self._restart(f"{item.name} was listed twice (page {self._page})")
            self._groups[item.name] = item
        if len(self._groups) == self._total:
            self._done = True
        return None

    def _restart(self, why: str) -> str:
        if self.restarts >= self.max_restarts:
            raise ListingError(
                f"the account kept changing while it was listed: {self.restarts + 1} "
                f"listings in a row did not add up (last: {why}); run again later"
            )
        self.restarts += 1
        self.last_restart = why
        self._page = 0
        self._total = None
        self._groups = {}
        return why
