"""List pages a window at a time (commands.paging): a real Runner, a scripted List endpoint."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping
from typing import Any

import orjson
import pytest

from tests.test_runner import envelope, make
from worker.api.account import Listing, ListingError
from worker.api.transport import Failure, Response
from worker.commands.paging import page_through
from worker.errors import RunAborted
from worker.runner.dispatch import Runner


class Pages:
    """A List endpoint over a still account. A higher page answers after fewer turns of the
    loop, so pages out together land in reverse order. Counts what was asked and how many
    requests were out at once."""

    def __init__(self, groups: int, *, bad: Mapping[int, Response] | None = None) -> None:
        self.names = [f"G{i}" for i in range(groups)]
        self.bad = dict(bad or {})
        self.asked: Counter[int] = Counter()
        self.landed: list[int] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def send(
        self, query: Mapping[str, str], headers: Mapping[str, str], body: bytes
    ) -> Response | Failure:
        asked = orjson.loads(body)
        n, size = asked["PageNum"], asked["PageSize"]
        assert query["Action"] == "ListPullToPushGroup" and asked["StatusList"] == [0]
        self.asked[n] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            for _ in range(max(1, 50 - n)):
                await asyncio.sleep(0)
        finally:
            self.in_flight -= 1
        self.landed.append(n)
        if n in self.bad:
            return self.bad[n]
        page = self.names[(n - 1) * size : n * size]
        items: list[dict[str, Any]] = [
            {"Name": name, "ProjectName": "default", "Status": 0} for name in page
        ]
        return envelope(result={"List": items, "Total": len(self.names)})


def runner(pages: Pages, concurrency: int | None = None) -> Runner:
    """test_runner's Runner (virtual clock, scripted pacer) sending to `pages`."""
    return make(pages, concurrency=concurrency)  # type: ignore[arg-type]  # any Sender will do


def test_every_page_is_asked_once_a_window_at_a_time_and_the_listing_is_whole() -> None:
    """21 groups at page size 2: 11 pages, each asked once; at most the runner's in-flight cap
    (3) out at once, more than one; answers landing out of order make a whole listing."""
    pages = Pages(21)
    the_runner = runner(pages, concurrency=3)
    listing = Listing(page_size=2)
    asyncio.run(page_through(the_runner, listing))
    assert pages.asked == Counter(range(1, 12))
    assert 1 < pages.max_in_flight <= 3
    assert pages.landed != sorted(pages.landed)  # out of order, and still whole
    assert listing.done and listing.whole and sorted(listing.groups) == sorted(pages.names)
    assert the_runner.tally.requests == 11 and the_runner.tally.codes == {"OK": 11}


def test_an_empty_account_takes_one_request() -> None:
    """Total 0 on page 1: one request, an empty listing."""
    pages = Pages(0)
    listing = Listing(page_size=2)
    asyncio.run(page_through(runner(pages), listing))
    assert pages.asked == Counter([1]) and listing.done and dict(listing.groups) == {}


def test_a_refused_page_stops_the_listing_with_its_own_error() -> None:
    """Page 4 answered InvalidParam: RunAborted itself (exit 7), not a group of errors; no
    page past the window is asked for afterwards."""
    pages = Pages(40, bad={4: envelope("InvalidParam", 400)})
    with pytest.raises(RunAborted) as caught:
        asyncio.run(page_through(runner(pages, concurrency=3), Listing(page_size=2)))
    assert caught.value.exit_code == 7
    assert max(pages.asked) < 20 and all(c == 1 for c in pages.asked.values())


def test_a_malformed_page_is_a_listing_error_itself() -> None:
    """Page 2's Result lacks Total: ListingError (exit 3) naming it, raised as itself."""
    bad = Response(status=200, body=orjson.dumps({"ResponseMetadata": {}, "Result": {"List": []}}))
    pages = Pages(10, bad={2: bad})
    with pytest.raises(ListingError, match=r"without Result\.Total"):
        asyncio.run(page_through(runner(pages), Listing(page_size=2)))
