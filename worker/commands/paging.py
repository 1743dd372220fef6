"""Sync's List pages at the rate: a window of List requests out at once, answered in any order.

Asked one at a time, a listing waits a whole answer between pages: 100 pages took 23-25 s
at 100-300 ms latency (4 pages/s against a budget of 10/s). Here page 1 goes alone (only its
Total says how many pages there are), then as many pages as the latency needs to keep the
rate busy (`window`: rate x latency x 1.5, within the runner's in-flight limit) go out
together, each through `Runner.read` (paced by the run's one budget, retried, never
recorded), and each answer is added to the Listing as it lands, in whatever order that is.

A page's 1000 items are checked and read a slice at a time, the event loop free between
slices: read at once they held it 5-15 ms, every send falling due meanwhile went out that
late, and the pacer's margin, which follows the spread of lateness it measures, widens to
match.

Memory stays bounded by the window: at most `window` pages are asked for and not yet added,
and an answer is added (decoded items turned into shared `Listed` values) as soon as it lands.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import orjson
import structlog

from worker.api import spec
from worker.api.account import Listing, Page, page_envelope, page_items
from worker.errors import WorkerError, raise_first
from worker.runner.dispatch import Runner

log = structlog.get_logger("worker")

SLICE = 100  # items read between two turns of the event loop: well under a millisecond


async def list_once(runner: Runner) -> tuple[Listing, float]:
    """One listing under the run's budget, its pages a window at a time (paging), and
    when it began (monotonic). The caller closes the listing (its groups are kept on disk)."""
    began = runner.clock()
    listing = Listing()

    def moved(how: str) -> None:
        log.info("sync.listing_moved", how=how, requests=listing.requests)

    try:  # the listing's groups are on disk: removed if it cannot be completed
        await page_through(runner, listing, moved)
    except BaseException:
        listing.close()
        raise
    log.info(
        "sync.listed",
        groups=len(listing.groups),
        requests=listing.requests,
        whole=listing.whole,
        moves=len(listing.moves),
    )
    return listing, began


async def page_through(
    runner: Runner, listing: Listing, on_moved: Callable[[str], None] | None = None
) -> None:
    """Ask for every page `listing` wants, a window at a time, until it is done.

    Raises what `Runner.read` raises (ListingFailed, RunAborted) and what the Listing raises
    (ListingError), as itself: the other pages still out are cancelled first. A drain
    (SIGTERM) cancels the reads waiting for the budget, as it cancels a lone read.
    """
    try:
        async with asyncio.TaskGroup() as tg:
            out: dict[asyncio.Task[dict[str, Any]], int] = {}
            while True:
                while len(out) < window(runner) and (body := listing.next_request()) is not None:
                    task = tg.create_task(runner.read(spec.LIST, orjson.dumps(body)))
                    out[task] = body["PageNum"]
                if not out:
                    break
                landed, _ = await asyncio.wait(out, return_when=asyncio.FIRST_COMPLETED)
                # In page order when several land together: the same answers, the same moves.
                for task in sorted(landed, key=out.__getitem__):
                    number = out.pop(task)
                    moved = listing.add(await _read(listing, task.result()), number)
                    if moved is not None and on_moved is not None:
                        on_moved(moved)
    except BaseExceptionGroup as group:
        raise_first(group, WorkerError)
    assert listing.done, listing


async def _read(listing: Listing, result: object) -> Page:
    """`parse_page(result)` a SLICE at a time, letting the loop run between slices."""
    raw, total = page_envelope(result, page_size=listing.page_size)
    items = page_items(raw, 0, SLICE, listing.share)
    for start in range(SLICE, len(raw), SLICE):
        await asyncio.sleep(0)
        items += page_items(raw, start, start + SLICE, listing.share)
    return Page(items=items, total=total)


def window(runner: Runner) -> int:
    """Pages out at once: what the rate keeps busy over one answer's time (Little's law,
    rate x latency, with half again to spare), at least one, at most the runner's in-flight
    limit. Not that limit itself: it keeps at least two out, and at 20-50 ms the second
    page only waits for the budget while another is checked (measured: a FlowLimitExceeded
    in each of 3 listings of 100 pages; one page at a time, none).
    """
    busy = math.ceil(runner.settings.pacing.rate * runner.concurrency.latency_s * 1.5)
    return max(1, min(runner.concurrency.limit, busy))
