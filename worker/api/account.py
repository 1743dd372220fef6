"""Account step (sync): what `ListPullToPushGroup` says the account holds. Pure.

`parse_page` checks one List `Result` strictly and turns it into `Listed` values;
`Listing` is the paging state machine that says which page to ask for next and when the
pages say there is no more. The API promises no order and no stability while paging, and a
busy account never holds still, so a listing that moved (Total moved, a Name seen twice, a
short page) is used as it is and the moves are reported: the plan made from it creates a
Name it did not see (answered `Exist` if it is there) and never deletes one it did not see.
Only the *content* of a page is checked strictly (`parse_page`).

The I/O is `commands.paging.page_through`'s, through the runner, several pages at a time:

    listing = Listing()
    while not listing.done:
        while window has room and (body := listing.next_request()) is not None:
            send body                       # runner.read: paced, retried
        result, page = the next answer to land, in any order
        listing.add_result(result, page)    # parse_page + add; says how the account moved
    account = listing.groups                # every group seen, each Name once
    listing.close()                         # the groups are kept on disk (listed_store)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from worker.api import spec
from worker.api.listed import Interner as Interner
from worker.api.listed import Listed as Listed
from worker.api.listed import Tag as Tag
from worker.api.listed_store import ListedStore
from worker.errors import ListingFailed

PAGE_SIZE: Final = 1000  # the API's maximum: one request lists a thousand groups
MAX_PAGES: Final = 1000  # PageNum is 1-1000: past page 1000 a group cannot be listed at all
AVAILABLE: Final = 0  # Status / StatusList value of a group that is not deleted


class ListingError(ListingFailed):
    """The account could not be listed completely and consistently (exit 3: nothing written)."""


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
    raw_items, total = page_envelope(result, page_size=page_size)
    share = share if share is not None else Interner()
    return Page(items=page_items(raw_items, 0, len(raw_items), share), total=total)


def page_envelope(result: object, *, page_size: int = PAGE_SIZE) -> tuple[list[object], int]:
    """The first half of `parse_page`: the Result's shape, its raw items and its Total.
    (paging.py parses the items a slice at a time between them, so that a page of 1000
    never holds the event loop, and with it the pacer's next send, for long.)"""
    if not isinstance(result, dict):
        raise ListingError(
            f"List answered a Result that is {spec.json_type(result)}, not an object"
        )
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
        raise ListingError(
            f"List answered Result.List as {spec.json_type(raw_items)}, not an array"
        )
    if len(raw_items) > page_size:
        raise ListingError(
            f"List answered {len(raw_items)} groups on one page; PageSize was {page_size}"
        )
    return raw_items, total


def page_items(raw_items: list[object], start: int, stop: int, share: Interner) -> list[Listed]:
    """The second half of `parse_page`: items `start` to `stop` checked and read."""
    return [_item(i, raw_items[i], share) for i in range(start, min(stop, len(raw_items)))]


def _item(i: int, raw: object, share: Interner) -> Listed:
    where = f"Result.List[{i}]"
    if not isinstance(raw, dict):
        raise ListingError(f"{where} is {spec.json_type(raw)}, not an object")
    name = raw.get("Name")
    if (reason := spec.name_problem(name)) is not None:
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
        raise ListingError(f"{where}.Tags must be an array, not {spec.json_type(raw_tags)}")
    return Listed(
        name=name,
        project=project,
        tags=share(tuple(_tag(f"{where}.Tags[{j}]", t, share) for j, t in enumerate(raw_tags))),
    )


def _tag(where: str, raw: object, share: Interner) -> Tag:
    if not isinstance(raw, dict):
        raise ListingError(f"{where} is {spec.json_type(raw)}, not an object")
    key, value, category = raw.get("Key"), raw.get("Value"), raw.get("Category")
    if not isinstance(key, str):
        raise ListingError(f"{where}.Key must be a string, not {_show(key)}")
    if not isinstance(value, str):
        raise ListingError(f"{where}.Value must be a string, not {_show(value)}")
    if category not in spec.TAG_CATEGORIES:
        raise ListingError(f"{where}.Category must be 'System' or 'Custom', not {_show(category)}")
    assert isinstance(category, str)
    return share((share(key), share(value), share(category)))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: object) -> str:
    """A decoded JSON value for a message: short, one line (the server's text is untrusted)."""
    text = repr(value) if isinstance(value, (str, int, float)) else spec.json_type(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Listing:
    """Pages through List until the pages say there is no more, and keeps what it saw.

    The API promises no order and no stability while paging, and a busy account never holds
    still, so a listing that moved (another Total, a Name twice, a short page) is used as it
    is: a Name seen twice counts once (the sighting added last wins), a Name not seen is
    simply not in `groups`. Paging goes on while a full page, or the largest Total seen, says
    more may come; MAX_PAGES bounds it. `moves` says how the listing moved (logged by the
    caller); `whole` says it did not move at all, so a Name it does not hold is known to be
    absent.

    Pages may be asked for several at a time and answered in any order: page 1 alone (only
    its Total tells how many pages there are), then every page up to what the largest Total
    and the full pages reach. `next_request` hands out the next page that may be asked for
    now, or None (done, or nothing more until an outstanding page is added); `add` takes
    the answer to a page, named by its PageNum. Pages are handed out in order, so the
    listing is done when nothing is outstanding and the last page handed out is the reach.

    The groups are kept on disk (listed_store.ListedStore), not in memory: `close` removes
    them (a Listing is also a context manager).

    Invariant: `_groups` holds every item of the pages added, each Name once; pages
    1.._asked were handed out, and `_outstanding` are those of them not added yet.
    """

    def __init__(self, *, page_size: int = PAGE_SIZE, tmp_dir: str | None = None) -> None:
        if not 1 <= page_size <= PAGE_SIZE:
            raise ValueError(f"page_size must be 1-{PAGE_SIZE}, not {page_size}")
        self.page_size = page_size
        self.requests = 0  # List requests asked for
        self.moves: list[str] = []  # how the account moved under the listing, in order
        self._asked = 0  # pages 1.._asked were handed out
        self._outstanding: set[int] = set()  # handed out, not added yet
        self._added = 0  # pages added so far
        self._reach = 1  # the last page to ask for, as the pages added so far say
        self._total: int | None = None  # the largest Total seen
        self._groups = ListedStore(tmp_dir=tmp_dir)
        self._done = False
        self._share = Interner()  # one copy of repeated values across pages

    def __repr__(self) -> str:
        return (
            f"<Listing page={self._added} collected={len(self._groups)} "
            f"total={self._total} outstanding={len(self._outstanding)} "
            f"moves={len(self.moves)} done={self._done}>"
        )

    def __enter__(self) -> Listing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the groups kept on disk. Idempotent."""
        self._groups.close()

    @property
    def done(self) -> bool:
        return self._done

    @property
    def outstanding(self) -> int:
        """Pages handed out and not added yet."""
        return len(self._outstanding)

    @property
    def whole(self) -> bool:
        """Done, and nothing moved: every Name of the account was seen exactly once."""
        return self._done and not self.moves and len(self._groups) == self._total

    @property
    def groups(self) -> ListedStore:
        """Name -> Listed for every group seen. Only once `done`."""
        if not self._done:
            raise RuntimeError("the listing is not complete")
        return self._groups

    def next_request(self) -> dict[str, Any] | None:
        """The next List body to send now, or None: the listing is complete, or nothing more
        may be asked for until an outstanding page is added (the first page, which says
        how many there are; or the last pages, which may say there are more)."""
        if self._done or self._asked >= self._reach:
            return None
        self._asked += 1
        self._outstanding.add(self._asked)
        self.requests += 1
        return {"PageNum": self._asked, "PageSize": self.page_size, "StatusList": [AVAILABLE]}

    @property
    def share(self) -> Interner:
        """The one copy of values repeated across this listing's pages (for page_items)."""
        return self._share

    def add_result(self, result: object, page_num: int | None = None) -> str | None:
        """`add(parse_page(result), page_num)` with this listing's page size."""
        page = parse_page(result, page_size=self.page_size, share=self._share)
        return self.add(page, page_num)

    def add(self, page: Page, page_num: int | None = None) -> str | None:
        """Take the answer to request `page_num` (its PageNum; may be left out while only one
        request is outstanding). Returns how the account moved, if it did.

        Raises ListingError when the account holds more groups than List can page through.
        """
        number = self._take(page_num)
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
        self._added += 1
        moved: list[str] = []
        if self._total is not None and page.total != self._total:
            moved.append(f"Total {self._total} -> {page.total} at page {number}")
        self._total = max(self._total or 0, page.total)
        seen_twice = _seen_twice(page.items, self._groups.present(i.name for i in page.items))
        self._groups.put_all(page.items)
        if seen_twice:
            moved.append(f"{seen_twice} Names listed twice (page {number})")
        before = (number - 1) * self.page_size
        expected = max(0, min(self.page_size, self._total - before))
        if len(page.items) != expected:
            moved.append(
                f"page {number} held {len(page.items)} groups where Total "
                f"{self._total} means {expected}"
            )
        # More may come while the largest Total reaches past a page, or a full page held
        # more than Total said (the account grew under a Total read before).
        reach = -(-self._total // self.page_size)
        if len(page.items) == self.page_size and len(page.items) > expected:
            reach = max(reach, number + 1)
        self._reach = min(MAX_PAGES, max(self._reach, reach))
        if not self._outstanding and self._asked >= self._reach:
            self._done = True
        self.moves.extend(moved)
        return "; ".join(moved) or None

    def _take(self, page_num: int | None) -> int:
        """The outstanding request a page answers; a page nobody asked for is a bug."""
        if page_num is None:
            if len(self._outstanding) > 1:
                raise RuntimeError("name the page: several requests are outstanding")
            page_num = next(iter(self._outstanding), None)
        if page_num is None or page_num not in self._outstanding:
            raise RuntimeError(f"add() without a request from next_request() (page {page_num})")
        self._outstanding.discard(page_num)
        return page_num


def _seen_twice(items: list[Listed], held: set[str]) -> int:
    """Items whose Name was seen before: on an earlier page (`held`) or earlier on this one."""
    seen = set(held)
    twice = 0
    for item in items:
        if item.name in seen:
            twice += 1
        seen.add(item.name)
    return twice
