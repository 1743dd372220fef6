"""rounds.Convergence and the delete freshness bound: pure, with fakes and an injected clock."""

from __future__ import annotations

from typing import Any

from worker.api.account import Listed
from worker.commands.sync_rounds import Rounds
from worker.plan import rounds
from worker.plan.reconcile import Scope


def g(name: str, project: str = "p", *tags: tuple[str, str, str]) -> Listed:
    return Listed(name=name, project=project, tags=tuple(tags))


def account(*groups: Listed) -> dict[str, Listed]:
    return {x.name: x for x in groups}


def test_fresh_is_at_most_sixty_seconds() -> None:
    """A listing begun 60 s ago may still serve a delete; one a moment older may not."""
    assert rounds.fresh(100.0, 160.0) and not rounds.fresh(100.0, 160.001)
    assert rounds.FRESH_S == 60.0


def test_a_credit_counts_while_a_lagging_listing_shows_the_state_before() -> None:
    """A create answered 2xx that the next listing does not show yet still counts as done."""
    conv = rounds.Convergence(account(), whole=True)
    conv.wrote("A", None, g("A"))
    conv.observe(account(), whole=True, relevant=[])
    assert "A" in conv.effective() and conv.credits and not conv.foreign


def test_a_credit_is_used_up_once_a_listing_shows_the_write() -> None:
    """Once shown, the listing is the truth for that Name: a later absence is not lag."""
    conv = rounds.Convergence(account(), whole=True)
    conv.wrote("A", None, g("A"))
    conv.observe(account(g("A")), whole=True, relevant=["A"])
    assert not conv.credits and conv.confirmed == 1
    conv.observe(account(), whole=True, relevant=["A"])
    assert "A" not in conv.effective() and conv.foreign == ["A"]


def test_a_third_state_voids_the_credit_and_marks_another_party() -> None:
    """An update answered 2xx, then a listing with tags nobody here wrote: someone else."""
    conv = rounds.Convergence(account(g("A")), whole=True)
    conv.wrote("A", g("A"), g("A", "p", ("k", "1", "Custom")))
    conv.observe(account(g("A", "p", ("k", "2", "Custom"))), whole=True, relevant=["A"])
    assert conv.foreign == ["A"] and not conv.credits
    assert conv.effective()["A"].tags == (("k", "2", "Custom"),)


def test_a_foreign_change_in_scope_drops_every_pending_credit() -> None:
    """Another party wrote in the scope (B appeared): a credit the listing does not show may
    have been undone, so only listings count from now on (the fighting-syncs case)."""
    conv = rounds.Convergence(account(), whole=True)
    conv.wrote("A", None, g("A"))
    conv.observe(account(g("B")), whole=True, relevant=["B"])
    assert conv.foreign == ["B"] and not conv.credits and "A" not in conv.effective()


def test_a_moved_listing_proves_presence_not_absence() -> None:
    """A listing that moved and does not show a credited delete or a known group proves
    nothing about them: the credit stays, the view keeps what it knew."""
    conv = rounds.Convergence(account(g("A"), g("K")), whole=True)
    conv.wrote("A", g("A"), None)
    conv.observe(account(g("N")), whole=False, relevant=["A", "K"])
    assert conv.credits and not conv.foreign
    assert set(conv.effective()) == {"K", "N"}


def test_an_exist_answer_waits_for_a_listing_and_is_then_compared() -> None:
    """A create answered Exist is in `exists` until a listing shows it; that listing's
    state is then what the next round compares."""
    conv = rounds.Convergence(account(), whole=True)
    conv.answered_exists("A")
    conv.observe(account(), whole=True, relevant=[])
    assert conv.exists == {"A"}
    conv.observe(account(g("A", "other")), whole=True, relevant=["A"])
    assert not conv.exists and conv.effective()["A"].project == "other" and not conv.foreign


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeRunner:
    """What Rounds._delete_items reads of a runner: its clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock


def test_no_delete_is_handed_out_from_a_listing_older_than_fresh_s() -> None:
    """Deletes stream while the listing is at most fresh_s old; the rest wait for the next
    round's listing (injected clock, no sleeping)."""
    clock = FakeClock()
    fake: Any = FakeRunner(clock)
    unused: Any = None  # neither the manifest nor the pause is read here
    the_rounds = Rounds(
        runner=fake,
        scan=unused,
        prune=True,
        scope=Scope(projects=frozenset({"p"})),
        max_delete=50,
        pause=unused,
        fresh_s=60.0,
    )
    the_rounds.listed_at = clock.t
    items = the_rounds._delete_items(tuple(g(f"X{i}") for i in range(5)))
    assert next(items).name == "X0"
    clock.t += 59.0
    assert next(items).name == "X1"
    clock.t += 1.5  # 60.5 s since the listing began
    assert list(items) == []
    assert the_rounds.deleted == 2


def test_a_group_only_an_older_moved_listing_showed_is_unconfirmed() -> None:
    """After a write, a manifest group counts as in place only once a listing made after
    the write shows it (or a write of ours vouches for it): the view's older word is not
    enough for exit 0."""
    conv = rounds.Convergence(account(g("A"), g("B")), whole=True)
    assert not conv.unconfirmed("A")
    conv.wrote("C", None, g("C"))
    conv.observe(account(g("B"), g("N")), whole=False, relevant=["A", "B"])
    assert "A" in conv.effective()  # a moved listing proves no absence...
    assert conv.unconfirmed("A")  # ...nor presence since the write
    assert not conv.unconfirmed("B") and not conv.unconfirmed("C")
    conv.observe(account(g("A")), whole=False, relevant=["A"])
    assert not conv.unconfirmed("A")  # shown by a listing after the last write


def test_deletes_come_from_the_latest_listing_only() -> None:
    """An extra the view keeps from an older, moved listing is not in `last`: the rounds
    never plan a delete from it."""
    conv = rounds.Convergence(account(g("X")), whole=True)
    conv.observe(account(g("Y")), whole=False, relevant=["X", "Y"])
    assert set(conv.effective()) == {"X", "Y"} and set(conv.last) == {"Y"}
