"""The account as List shows it: strict page parsing and the paging state machine."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from worker.api.account import (
    MAX_PAGES,
    PAGE_SIZE,
    Interner,
    Listed,
    Listing,
    ListingError,
    Page,
    parse_page,
)
from worker.errors import Exit, ListingFailed


def item(
    name: str,
    project: str = "default",
    tags: list[tuple[str, str, str]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "Name": name,
        "ProjectName": project,
        "Status": 0,
        "Tags": [{"Category": c, "Key": k, "Value": v} for k, v, c in tags or []],
    }
    out.update(extra)
    return out


def result(items: list[dict[str, Any]], total: int | None = None) -> dict[str, Any]:
    return {"List": items, "Total": len(items) if total is None else total}


def test_parse_page_reads_groups_and_keeps_listed_tag_order() -> None:
    """Name, project and tags are read; tags keep the listed order; the set ignores it."""
    page = parse_page(
        result(
            [item("华北01", "p1", [("区域", "华北", "Custom"), ("k", "v", "System")]), item("B2")],
            total=7,
        )
    )
    assert page.total == 7
    first, second = page.items
    assert first == Listed(
        name="华北01", project="p1", tags=(("区域", "华北", "Custom"), ("k", "v", "System"))
    )
    assert first.tag_set == frozenset({("k", "v", "System"), ("区域", "华北", "Custom")})
    assert second == Listed(name="B2", project="default", tags=())


def test_parse_page_ignores_unknown_fields_and_reads_null_as_empty() -> None:
    """Extra fields are ignored; `List: null`, `Tags: null` and a missing Tags mean empty."""
    page = parse_page(
        {
            "List": [
                item("A1", Extra=1, CreateTime="x") | {"Tags": None},
                {"Name": "A2", "ProjectName": "p", "Status": 0},
                item("A3", tags=[("k", "v", "Custom")])
                | {"Tags": [{"Category": "Custom", "Key": "k", "Value": "v", "Id": 9}]},
            ],
            "Total": 3,
            "PageInfo": {},
        }
    )
    assert [(g.name, g.tags) for g in page.items] == [
        ("A1", ()),
        ("A2", ()),
        ("A3", (("k", "v", "Custom"),)),
    ]
    assert parse_page({"List": None, "Total": 0}) == Page(items=[], total=0)


MALFORMED: list[tuple[object, str]] = [
    (None, "null, not an object"),
    ([], "an array, not an object"),
    ({"List": []}, "without Result.Total"),
    ({"Total": 0}, "without Result.List"),
    ({"List": [], "Total": -1}, "Result.Total -1"),
    ({"List": [], "Total": True}, "Result.Total True"),
    ({"List": [], "Total": "3"}, "Result.Total '3'"),
    ({"List": [], "Total": 1.5}, "Result.Total 1.5"),
    ({"List": {}, "Total": 0}, "Result.List as an object"),
    (result(["A1"]), "Result.List[0] is a string"),  # type: ignore[list-item]
    (
        result([item("A1"), {"ProjectName": "p", "Status": 0}]),
        "Result.List[1].Name must be a string, not null",
    ),
    (result([item("")]), "Result.List[0].Name must not be empty"),
    (result([item("a-b")]), "Result.List[0].Name may hold only"),
    (result([item("X" * 21)]), "Result.List[0].Name is 21 characters long"),
    (
        result([item("A1") | {"ProjectName": ""}]),
        "Result.List[0] (A1).ProjectName must be a non-empty string",
    ),
    (
        result([item("A1") | {"ProjectName": 5}]),
        "Result.List[0] (A1).ProjectName must be a non-empty string, not 5",
    ),
    (
        result([{"Name": "A1", "ProjectName": "p"}]),
        "Result.List[0] (A1).Status must be a whole number, not null",
    ),
    (result([item("A1") | {"Status": False}]), "Status must be a whole number, not False"),
    (
        result([item("A1") | {"Status": 1}]),
        "Result.List[0] (A1).Status is 1 in a listing of available groups",
    ),
    (
        result([item("A1") | {"Tags": {}}]),
        "Result.List[0] (A1).Tags must be an array, not an object",
    ),
    (
        result([item("A1") | {"Tags": ["k=v"]}]),
        "Result.List[0] (A1).Tags[0] is a string, not an object",
    ),
    (
        result([item("A1") | {"Tags": [{"Value": "v", "Category": "Custom"}]}]),
        "Tags[0].Key must be a string, not null",
    ),
    (
        result([item("A1") | {"Tags": [{"Key": "k", "Value": 1, "Category": "Custom"}]}]),
        "Tags[0].Value must be a string, not 1",
    ),
    (
        result([item("A1", tags=[("k", "v", "custom")])]),
        "Tags[0].Category must be 'System' or 'Custom', not 'custom'",
    ),
    (
        result([item("A1") | {"Tags": [{"Key": "k", "Value": "v"}]}]),
        "Tags[0].Category must be 'System' or 'Custom', not null",
    ),
]


@pytest.mark.parametrize(("raw", "message"), MALFORMED)
def test_parse_page_refuses_malformed_results(raw: object, message: str) -> None:
    """Every malformed Result is a ListingError (exit 3) that names what was wrong."""
    with pytest.raises(ListingError, match=None) as err:
        parse_page(raw)
    assert message in str(err.value)
    assert isinstance(err.value, ListingFailed) and err.value.exit_code == Exit.RETRY_LATER


def test_parse_page_bounds_the_page_to_its_size() -> None:
    """A page with more items than PageSize is malformed, not data."""
    with pytest.raises(ListingError, match="3 groups on one page; PageSize was 2"):
        parse_page(result([item("A1"), item("A2"), item("A3")]), page_size=2)
    assert len(parse_page(result([item("A1"), item("A2")]), page_size=2).items) == 2


def test_parse_page_keeps_untrusted_values_short_in_messages() -> None:
    """A huge bad value from the server is cut in the message, not echoed whole."""
    with pytest.raises(ListingError) as err:
        parse_page(result([item("A1") | {"ProjectName": 7, "Status": "x" * 10_000}]))
    with pytest.raises(ListingError) as err:
        parse_page(result([item("A1") | {"Status": "x" * 10_000}]))
    assert len(str(err.value)) < 200


# --- paging ------------------------------------------------------------------------------


Server = Callable[[dict[str, Any]], dict[str, Any]]


def offset_server(
    account: list[dict[str, Any]], *, after_page: Callable[[int], None] | None = None
) -> Server:
    """A List endpoint over a mutable list, paging by offset like a SQL LIMIT/OFFSET."""
    calls = [0]

    def answer(body: dict[str, Any]) -> dict[str, Any]:
        calls[0] += 1
        n, size = body["PageNum"], body["PageSize"]
        out = result(account[(n - 1) * size : n * size], total=len(account))
        if after_page is not None:
            after_page(calls[0])
        return out

    return answer


def drive(listing: Listing, server: Server) -> list[dict[str, Any]]:
    """Run the listing to the end the way the runner does; returns the bodies sent."""
    sent = []
    while (body := listing.next_request()) is not None:
        sent.append(body)
        listing.add_result(server(body))
    return sent


def test_listing_pages_until_total_and_sends_exact_bodies() -> None:
    """Five groups at page size 2 take three List requests with PageNum 1..3, StatusList [0]."""
    account = [item(f"G{i}") for i in range(5)]
    listing = Listing(page_size=2)
    sent = drive(listing, offset_server(account))
    assert sent == [{"PageNum": n, "PageSize": 2, "StatusList": [0]} for n in (1, 2, 3)]
    assert sorted(listing.groups) == [f"G{i}" for i in range(5)]
    assert listing.moves == [] and listing.requests == 3 and listing.whole


def test_listing_default_page_size_is_the_api_maximum() -> None:
    """Without a page size the listing asks for 1000 per page."""
    assert Listing().next_request() == {"PageNum": 1, "PageSize": PAGE_SIZE, "StatusList": [0]}


def test_listing_of_an_empty_account_takes_one_request() -> None:
    """Total 0 with an empty page is a complete, empty listing."""
    listing = Listing(page_size=3)
    assert drive(listing, offset_server([])) == [{"PageNum": 1, "PageSize": 3, "StatusList": [0]}]
    assert listing.groups == {}


def test_listing_exact_multiple_of_page_size_needs_no_extra_page() -> None:
    """Four groups at page size 2 end after page 2: no empty third page is asked for."""
    listing = Listing(page_size=2)
    assert len(drive(listing, offset_server([item(f"G{i}") for i in range(4)]))) == 2


def test_listing_is_never_partial() -> None:
    """Before the last page `groups` refuses: there is no way to read part of a listing."""
    listing = Listing(page_size=2)
    body = listing.next_request()
    assert body is not None
    listing.add_result(result([item("A1"), item("A2")], total=3))
    with pytest.raises(RuntimeError, match="not complete"):
        _ = listing.groups
    assert "collected=2 total=3" in repr(listing)


def test_listing_refuses_out_of_order_use() -> None:
    """Nothing more is handed out before page 1 is added (only its Total says how many pages
    there are); a page nobody asked for, or added twice, is a bug."""
    listing = Listing(page_size=2)
    with pytest.raises(RuntimeError, match="without a request"):
        listing.add(Page(items=[], total=0))
    assert listing.next_request() == {"PageNum": 1, "PageSize": 2, "StatusList": [0]}
    assert listing.next_request() is None and listing.outstanding == 1
    with pytest.raises(RuntimeError, match=r"without a request.*\(page 2\)"):
        listing.add(Page(items=[], total=0), 2)
    listing.add(Page(items=[Listed(name="A1", project="p")], total=1), 1)
    with pytest.raises(RuntimeError, match=r"without a request.*\(page 1\)"):
        listing.add(Page(items=[], total=1), 1)
    assert listing.done and listing.requests == 1


# --- pages out at once, answered in any order ----------------------------------------------


def snapshot_server(account: list[dict[str, Any]]) -> Callable[[int, int], dict[str, Any]]:
    """Page `n` of a fixed account, by offset."""

    def answer(n: int, size: int) -> dict[str, Any]:
        return result(account[(n - 1) * size : n * size], total=len(account))

    return answer


def finished(listing: Listing) -> bool:
    """`listing.done`, read through a call: mypy would keep a property narrowed across adds."""
    return listing.done


def ask_all(listing: Listing) -> list[int]:
    """Every PageNum the listing hands out now."""
    out = []
    while (body := listing.next_request()) is not None:
        out.append(body["PageNum"])
    return out


def test_after_page_one_every_page_total_needs_is_handed_out_at_once() -> None:
    """Total 7 at page size 2: page 1 alone, then pages 2-4 together, then nothing more; the
    listing is not done while any of them is out."""
    serve = snapshot_server([item(f"G{i}") for i in range(7)])
    listing = Listing(page_size=2)
    assert ask_all(listing) == [1]
    listing.add_result(serve(1, 2), 1)
    assert ask_all(listing) == [2, 3, 4] and listing.outstanding == 3
    listing.add_result(serve(4, 2), 4)
    listing.add_result(serve(2, 2), 2)
    assert not finished(listing) and ask_all(listing) == []
    listing.add_result(serve(3, 2), 3)
    assert listing.done and listing.whole and listing.requests == 4
    assert sorted(listing.groups) == [f"G{i}" for i in range(7)]


@pytest.mark.parametrize("seed", range(20))
def test_pages_answered_in_any_order_give_the_listing_the_page_order_gives(seed: int) -> None:
    """A still account of 23 groups at page size 3, its pages 2-8 added in a random order:
    the same groups, no move reported, whole, every page asked for once."""
    import random

    account = [item(f"G{i}", tags=[("k", str(i % 3), "Custom")]) for i in range(23)]
    serve = snapshot_server(account)
    listing = Listing(page_size=3)
    assert ask_all(listing) == [1]
    listing.add_result(serve(1, 3), 1)
    rest = ask_all(listing)
    assert rest == list(range(2, 9))
    random.Random(seed).shuffle(rest)
    for n in rest:
        assert listing.add_result(serve(n, 3), n) is None
    in_order = Listing(page_size=3)
    drive(in_order, offset_server(account))
    assert listing.done and listing.whole and listing.moves == []
    assert listing.groups == in_order.groups and listing.requests == in_order.requests == 8


def test_a_total_that_grows_on_a_later_page_extends_the_listing() -> None:
    """Page 3 answers Total 9 where page 1 said 6 (size 2), before page 2 lands: pages 4 and
    5 are asked for at once, and the move is reported with the page that saw it."""
    serve = snapshot_server([item(f"G{i}") for i in range(9)])
    listing = Listing(page_size=2)
    ask_all(listing)
    listing.add_result(result([item("G0"), item("G1")], total=6), 1)
    assert ask_all(listing) == [2, 3]
    listing.add_result(serve(3, 2), 3)
    assert ask_all(listing) == [4, 5] and listing.outstanding == 3
    assert listing.moves == ["Total 6 -> 9 at page 3"]
    for n in (5, 2, 4):
        listing.add_result(serve(n, 2), n)
    assert listing.done and sorted(listing.groups) == [f"G{i}" for i in range(9)]
    assert not listing.whole and listing.requests == 5


def test_a_total_that_shrinks_on_a_later_page_keeps_the_largest() -> None:
    """A page answered with a smaller Total than page 1's: the largest Total still says which
    pages to ask for; the short page is kept and reported."""
    listing = Listing(page_size=2)
    ask_all(listing)
    listing.add_result(result([item("G0"), item("G1")], total=6), 1)
    assert ask_all(listing) == [2, 3]
    listing.add_result(result([], total=4), 3)
    assert not finished(listing)
    listing.add_result(result([item("G2"), item("G3")], total=4), 2)
    assert listing.done and sorted(listing.groups) == ["G0", "G1", "G2", "G3"]
    assert any("Total 6 -> 4 at page 3" in m for m in listing.moves)
    assert any("page 3 held 0 groups where Total 6 means 2" in m for m in listing.moves)


def test_a_full_last_page_asks_for_one_more_even_while_others_are_out() -> None:
    """Page 3 of a Total-5 listing (size 2) answers full before page 2 lands: the account grew,
    so page 4 is asked for; the listing ends when page 4 says no more and page 2 is in."""
    listing = Listing(page_size=2)
    ask_all(listing)
    listing.add_result(result([item("G0"), item("G1")], total=5), 1)
    assert ask_all(listing) == [2, 3]
    listing.add_result(result([item("G4"), item("G5")], total=5), 3)
    assert ask_all(listing) == [4]
    listing.add_result(result([], total=6), 4)
    assert not finished(listing)
    listing.add_result(result([item("G2"), item("G3")], total=6), 2)
    assert listing.done and sorted(listing.groups) == [f"G{i}" for i in range(6)]


def test_a_name_on_two_pages_answered_out_of_order_counts_once_the_last_added_wins() -> None:
    """G1 on page 3 (added first) and page 2 (added last): held once, as page 2 said it."""
    listing = Listing(page_size=2)
    ask_all(listing)
    listing.add_result(result([item("G0"), item("A1")], total=6), 1)
    ask_all(listing)
    listing.add_result(result([item("G1", "three"), item("G5")], total=6), 3)
    listing.add_result(result([item("G1", "two"), item("G3")], total=6), 2)
    assert listing.done and listing.groups["G1"].project == "two"
    assert any("1 Names listed twice (page 2)" in m for m in listing.moves)
    assert not listing.whole


def test_several_outstanding_pages_must_be_named() -> None:
    """With pages 2 and 3 out, an answer without its PageNum cannot be placed: a bug."""
    listing = Listing(page_size=1)
    ask_all(listing)
    listing.add_result(result([item("A1")], total=3))
    assert ask_all(listing) == [2, 3]
    with pytest.raises(RuntimeError, match="name the page"):
        listing.add_result(result([item("A2")], total=3))


def test_pages_out_at_once_never_pass_max_pages() -> None:
    """Total = MAX_PAGES x size: pages 2..MAX_PAGES are handed out, never one past; answered
    in reverse, the listing is complete."""
    listing = Listing(page_size=1)
    ask_all(listing)
    listing.add_result(result([item("G1")], total=MAX_PAGES), 1)
    rest = ask_all(listing)
    assert rest == list(range(2, MAX_PAGES + 1))
    for n in reversed(rest):
        listing.add_result(result([item(f"G{n}")], total=MAX_PAGES), n)
    assert listing.done and len(listing.groups) == MAX_PAGES and ask_all(listing) == []


def test_a_later_page_past_the_pageable_maximum_is_refused() -> None:
    """Page 2 says the account outgrew what List can page through: ListingError."""
    listing = Listing(page_size=1)
    ask_all(listing)
    listing.add_result(result([item("G1")], total=5), 1)
    ask_all(listing)
    with pytest.raises(ListingError, match="holds 1001 groups"):
        listing.add_result(result([item("G3")], total=MAX_PAGES + 1), 3)


def test_a_listing_whose_total_moves_is_used_and_pages_to_the_largest_total() -> None:
    """A group created while paging moves Total: the listing goes on (no restart) to the
    largest Total seen, says how it moved, and holds every Name it saw once."""
    account = [item(f"G{i}") for i in range(5)]

    def create_once(call: int) -> None:
        if call == 1:
            account.insert(0, item("New1"))

    listing = Listing(page_size=2)
    sent = drive(listing, offset_server(account, after_page=create_once))
    assert [b["PageNum"] for b in sent] == [1, 2, 3]
    assert listing.moves and "Total 5 -> 6 at page 2" in listing.moves[0]
    assert not listing.whole
    # G1 was on page 1 and again on page 2 (shifted): counted once. New1 was not seen.
    assert sorted(listing.groups) == ["G0", "G1", "G2", "G3", "G4"]


def test_a_name_seen_twice_counts_once_and_the_later_sighting_wins() -> None:
    """A create and a delete that keep Total but push a Name onto the next page: the Name
    is held once, with what its later page said; the move is reported."""
    account = [item(f"G{i}") for i in range(5)]

    def shift_once(call: int) -> None:
        if call == 1:  # A0 created in front, G4 deleted: Total stays 5, G1 moves to page 2
            account.insert(0, item("A0"))
            del account[-1]
            account[2] = item("G1", "moved")

    listing = Listing(page_size=2)
    drive(listing, offset_server(account, after_page=shift_once))
    assert any("1 Names listed twice (page 2)" in m for m in listing.moves)
    assert sorted(listing.groups) == ["G0", "G1", "G2", "G3"]
    assert listing.groups["G1"].project == "moved"


def test_listing_cannot_see_a_balanced_move_that_hides_a_name() -> None:
    """Known limit: a delete in front and a create behind between pages keep every count right
    and pull a Name back onto a page already read. The listing misses G2 and still holds G0
    (deleted after it was read): a plan can then only send a create answered 'exists', an
    update or delete answered ResourceNotFound, or leave a delete to the next sync."""
    account = [item(f"G{i}") for i in range(5)]

    def shift_once(call: int) -> None:
        if call == 1:
            del account[0]
            account.append(item("G9"))

    listing = Listing(page_size=2)
    drive(listing, offset_server(account, after_page=shift_once))
    assert listing.moves == [] and sorted(listing.groups) == ["G0", "G1", "G3", "G4", "G9"]


def test_a_duplicate_within_one_page_counts_once() -> None:
    """The same Name twice on one page is held once; the listing is not whole."""
    listing = Listing(page_size=3)
    listing.next_request()
    assert listing.add_result(result([item("A1"), item("A1")], total=2)) is not None
    assert listing.done and list(listing.groups) == ["A1"] and not listing.whole


@pytest.mark.parametrize(
    ("items", "total", "why", "more"),
    [
        (["A1"], 3, "page 1 held 1 groups where Total 3 means 2", True),  # short page
        ([], 1, "page 1 held 0 groups where Total 1 means 1", False),  # empty, Total says one
        (["A1"], 0, "page 1 held 1 groups where Total 0 means 0", False),  # beyond Total
        (["A1", "A2"], 1, "page 1 held 2 groups where Total 1 means 1", True),  # full, grew
    ],
)
def test_a_page_with_the_wrong_count_is_kept_and_reported(
    items: list[str], total: int, why: str, more: bool
) -> None:
    """A page shorter or longer than Total implies is kept; paging goes on while Total or a
    full page says more may come."""
    listing = Listing(page_size=2)
    listing.next_request()
    assert listing.add_result(result([item(n) for n in items], total=total)) == why
    assert sorted(listing.groups if listing.done else {}) == ([] if more else sorted(items))
    assert listing.done is not more
    if more:
        assert listing.next_request() == {"PageNum": 2, "PageSize": 2, "StatusList": [0]}


def test_an_account_that_never_holds_still_is_listed_in_bounded_requests() -> None:
    """A group appears after every page: the listing still ends (no 'kept changing' error),
    after the pages the largest Total asks for, with every group it saw."""
    account = [item(f"G{i}") for i in range(3)]

    def grow(call: int) -> None:
        account.append(item(f"N{call}"))

    listing = Listing(page_size=2)
    sent = drive(listing, offset_server(account, after_page=grow))
    assert listing.done and len(sent) <= 10
    assert {"G0", "G1", "G2"} <= set(listing.groups) and listing.moves


def test_listing_refuses_more_groups_than_list_can_page_through() -> None:
    """Total above 1000 pages x PageSize (1 000 000 at 1000) is an error, never a partial plan."""
    listing = Listing()
    listing.next_request()
    with pytest.raises(
        ListingError, match="holds 1000001 groups; List can page through at most 1000000"
    ):
        listing.add(
            Page(items=[Listed(name=f"G{i}", project="p") for i in range(1000)], total=1_000_001)
        )


def test_listing_accepts_exactly_the_pageable_maximum() -> None:
    """Total = MAX_PAGES x PageSize is listable: the last page is PageNum 1000."""
    size = 1
    listing = Listing(page_size=size)
    account = [item(f"G{i}") for i in range(MAX_PAGES * size)]
    sent = drive(listing, offset_server(account))
    assert sent[-1]["PageNum"] == MAX_PAGES and len(listing.groups) == MAX_PAGES


def test_listing_refuses_a_page_larger_than_its_size() -> None:
    """A Page built elsewhere with too many items is refused by add too."""
    listing = Listing(page_size=1)
    listing.next_request()
    with pytest.raises(ListingError, match="2 groups on one page"):
        listing.add(
            Page(items=[Listed(name="A1", project="p"), Listed(name="A2", project="p")], total=2)
        )


def test_listing_shares_repeated_projects_and_tag_lists() -> None:
    """Groups with equal tag lists and projects hold one shared copy (memory per group)."""
    tags = [("区域", "华北", "Custom"), ("env", "prod", "System")]
    listing = Listing(page_size=3)
    drive(listing, offset_server([item(f"G{i}", "proj", tags) for i in range(3)]))
    g = list(listing.groups.values())
    assert g[0].tags is g[1].tags is g[2].tags and g[0].project is g[2].project


def test_listing_memory_per_group_is_small() -> None:
    """5 000 listed groups (CJK names, decoded from the wire) cost < 300 bytes each."""
    n, size = 5_000, 1000
    projects = ["default", "直播一部", "live2"]
    tags = [[("区域", r, "Custom"), ("env", "prod", "System")] for r in ("华北", "华南", "华东")]
    wire = [
        orjson.dumps(
            result(
                [
                    item(f"华北直播群组{i:06d}", projects[i % 3], tags[i % 3])
                    for i in range(p * size, (p + 1) * size)
                ],
                total=n,
            )
        )
        for p in range(n // size)
    ]
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        listing = Listing(page_size=size)
        for page in wire:
            listing.next_request()
            listing.add_result(orjson.loads(page))  # the decoded page is garbage right after
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert len(listing.groups) == n
    assert grown / n < 300, grown / n


def test_interner_keeps_a_bounded_number_of_values() -> None:
    """Values past the limit are handed back unshared: the table never outgrows `limit`."""
    share = Interner(limit=2)
    a, b = "".join(["x", "1"]), "".join(["x", "1"])
    assert a is not b and share(a) is a and share(b) is a
    share(("k", "v", "Custom"))
    c = "".join(["y", "2"])
    assert share(c) is c and len(share) == 2
