"""listed_store: the listing kept on disk (put/get/iterate/overwrite, sizes, files removed)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from worker.api.account import Listed, Listing
from worker.api.listed_store import (
    BATCH,
    ListedStore,
    NameSet,
    differing,
    in_name_order,
    not_in,
    read_ahead,
)
from worker.plan import rounds


def g(name: str, project: str = "p", *tags: tuple[str, str, str]) -> Listed:
    return Listed(name=name, project=project, tags=tuple(tags))


def test_put_get_contains_and_missing(tmp_path: Path) -> None:
    """A group put comes back equal, tags in their listed order; a missing Name is absent."""
    with ListedStore(tmp_dir=str(tmp_path)) as store:
        a = g("A", "p", ("k", "2", "System"), ("k", "1", "Custom"))
        store.put(a)
        assert store["A"] == a and store.get("A") == a and "A" in store
        not_a_name: object = 3
        assert store.get("B") is None and "B" not in store and not_a_name not in store
        with pytest.raises(KeyError):
            store["B"]


def test_read_ahead_answers_as_single_lookups_do_and_a_write_is_never_hidden(
    tmp_path: Path,
) -> None:
    """Names read ahead a batch at a time answer exactly as one lookup each would (held or
    not, tags, the listing's number); a write after a read ahead is seen at once."""
    with ListedStore(tmp_dir=str(tmp_path)) as store:
        held = [g(f"N{i:05d}", "p", ("k", str(i % 3), "Custom")) for i in range(0, 2 * BATCH, 2)]
        store.put_all(held, listing=4)
        asked = [f"N{i:05d}" for i in range(2 * BATCH + 7)]
        seen = []
        for name in read_ahead(asked, lambda n: n, store, {"plain": g("plain")}):
            seen.append((name, store.get(name), name in store, store.listing_of(name)))
        expected = {x.name: x for x in held}
        assert seen == [
            (n, expected.get(n), n in expected, 4 if n in expected else None) for n in asked
        ]
        store.prefetch(["N00000", "N00001"])
        store.put(g("N00001", "q"), listing=5)  # a write after the read ahead
        store.put_all([g("N00000", "r")], listing=6)
        assert store["N00001"].project == "q" and store.listing_of("N00001") == 5
        assert store["N00000"].project == "r" and store.listing_of("N00000") == 6
        store.prefetch(["N00002"])
        store.absorb({"N00002": g("N00002", "s")}, 7, replace=True)
        assert store["N00002"].project == "s" and "N00000" not in store


def test_differing_names_what_either_side_shows_otherwise(tmp_path: Path) -> None:
    """Held by one side only, another project, other tags: named once each, in Name order,
    the same for two stores (compared inside SQLite) as for plain mappings; the stores can
    be compared again and absorbed afterwards (the comparison lets go of the other file)."""
    tag = ("k", "v", "Custom")
    old = [g("A"), g("B", "p", tag), g("C"), g("D", "p", tag, ("k", "w", "Custom")), g("E")]
    new = [g("B"), g("C", "q"), g("D", "p", tag, ("k", "w", "Custom")), g("E"), g("F")]
    with ListedStore(tmp_dir=str(tmp_path)) as a, ListedStore(tmp_dir=str(tmp_path)) as b:
        a.put_all(old)
        b.put_all(new)
        plain_a, plain_b = {x.name: x for x in old}, {x.name: x for x in new}
        for left, right in ((a, b), (plain_a, plain_b), (a, plain_b)):
            with differing(left, right) as names:
                assert list(names) == ["A", "B", "C", "F"]
        with differing(a, b) as names:
            assert next(names) == "A"  # left early: the other file is let go all the same
        a.absorb(b, 2, replace=True)
        with differing(a, b) as names:
            assert list(names) == []


def test_a_name_put_twice_is_held_once_the_later_wins(tmp_path: Path) -> None:
    """Overwriting keeps one entry per Name, its latest state; the size counts Names."""
    with ListedStore(tmp_dir=str(tmp_path)) as store:
        store.put_all([g("A"), g("B"), g("A", "q")])  # twice within one batch
        store.put(g("B", "r", ("k", "v", "Custom")))  # and again later
        assert len(store) == 2
        assert store["A"].project == "q" and store["B"].tags == (("k", "v", "Custom"),)


def test_iteration_is_in_python_sorted_order(tmp_path: Path) -> None:
    """Names come back in code-point order (UTF-8 byte order), as `sorted` gives them."""
    names = ["b", "A", "华北", "a-1", "Z", "é", "a"]
    with ListedStore(tmp_dir=str(tmp_path)) as store:
        store.put_all(g(n) for n in names)
        assert list(store) == sorted(names) == list(in_name_order(store))
        assert [x.name for x in store.values()] == sorted(names)
        assert dict(store.items()) == {n: g(n) for n in names}


def test_sizes_across_batches(tmp_path: Path) -> None:
    """Thousands of Names over several batches, some repeated: the size is the Names held."""
    with ListedStore(tmp_dir=str(tmp_path)) as store:
        store.put_all(g(f"n{i:05d}") for i in range(2500))
        store.put_all(g(f"n{i:05d}", "q") for i in range(2000, 3000))
        assert len(store) == 3000 and store["n02100"].project == "q"
        assert store.present(["n00001", "x", "n02999", "n00001"]) == {"n00001", "n02999"}


def test_file_is_private_and_removed_on_close(tmp_path: Path) -> None:
    """The file is 0600 in a 0700 directory of its own, and both are gone after close."""
    store = ListedStore(tmp_dir=str(tmp_path))
    store.put(g("A"))
    path = Path(store.path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    store.close()
    store.close()  # idempotent
    assert not path.parent.exists() and os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError):
        store.get("A")


def test_removed_on_an_exception_inside_with(tmp_path: Path) -> None:
    """A store used as a context manager is removed however the block ends."""
    with pytest.raises(ValueError), ListedStore(tmp_dir=str(tmp_path)) as store:
        store.put(g("A"))
        raise ValueError
    assert os.listdir(tmp_path) == []


def test_absorb_replaces_or_adds_and_numbers_the_listing(tmp_path: Path) -> None:
    """absorb(replace=True) drops what the other does not hold; False keeps it. Each Name
    carries the number of the listing that last showed it."""
    with ListedStore(tmp_dir=str(tmp_path)) as view, ListedStore(tmp_dir=str(tmp_path)) as new:
        view.absorb({"A": g("A"), "B": g("B")}, 1, replace=True)
        new.put_all([g("B", "q"), g("C")])
        view.absorb(new, 2, replace=False)
        assert list(view) == ["A", "B", "C"] and view["B"].project == "q"
        assert (view.listing_of("A"), view.listing_of("C"), view.listing_of("X")) == (1, 2, None)
        view.absorb(new, 3, replace=True)
        assert list(view) == ["B", "C"] and len(view) == 2 and view.listing_of("B") == 3


def test_name_set_and_the_extras_walk(tmp_path: Path) -> None:
    """not_in walks the account and the Name set in order: the account's groups the set
    lacks, sorted, for a store or a plain dict."""
    with NameSet(tmp_dir=str(tmp_path)) as named, ListedStore(tmp_dir=str(tmp_path)) as store:
        named.update(["c", "a", "zz", "a"])
        assert "a" in named and "b" not in named and list(named) == ["a", "c", "zz"]
        store.put_all(g(n) for n in ["d", "a", "b", "c"])
        assert [x.name for x in not_in(store, named)] == ["b", "d"]
        assert [x.name for x in not_in({"q": g("q"), "c": g("c")}, named)] == ["q"]


def test_a_listing_that_fails_or_closes_leaves_no_file(tmp_path: Path) -> None:
    """A Listing's groups live in its store: closing the listing removes the file."""
    with Listing(tmp_dir=str(tmp_path)) as listing:
        assert len(os.listdir(tmp_path)) == 1
        assert listing.next_request() is not None
        listing.add_result({"Total": 1, "List": [{"Name": "A", "ProjectName": "p", "Status": 0}]})
        assert listing.done and listing.whole and listing.groups["A"] == g("A")
    assert os.listdir(tmp_path) == []


def test_convergence_shown_counts_from_the_first_listing_after_a_write() -> None:
    """`shown` is a listing number: a Name listed before the last write is not shown until
    a later listing lists it; the view's file goes with close()."""
    with rounds.Convergence({"A": g("A"), "B": g("B")}, whole=True) as conv:
        assert conv.shown("A") and not conv.unconfirmed("B")
        conv.wrote("C", None, g("C"))
        conv.observe({"B": g("B")}, whole=False, relevant=["A", "B"])
        assert not conv.shown("A") and conv.shown("B") and not conv.shown("C")
        assert conv.unconfirmed("A") and not conv.unconfirmed("C")  # a credit vouches
        eff = conv.effective()
        assert list(eff) == ["A", "B", "C"] and len(eff) == 3 and eff["C"] == g("C")
        path = Path(conv.view.path)
    assert not path.exists()
