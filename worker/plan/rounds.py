"""Convergence step (sync): what a sync knows about the account across its rounds. Pure.

A sync lists, writes the difference, then lists again and compares: what is still different
is carried out in another round, at most MAX_ROUNDS rounds, with ROUND_PAUSE_S before each
listing after the second (a lagging listing catches up meanwhile). `Convergence` holds what
the listings and the writes of one invocation say:

    view       the account as the listings showed it: replaced by a listing that did not
               move (`whole`), else updated by it (a moved listing proves presence, never
               absence)
    last       the latest listing alone: the only source of deletes (a Name the view keeps
               from an older, moved listing may be long gone or re-created elsewhere)
    shown      the Names a listing has shown since the last write (kept as the number of
               the listing that last showed each Name): a manifest group counts
               as in place only when shown there (or credited), never from the view alone
    credits    writes answered 2xx in this invocation that no listing has shown yet: they
               count as done (the listing may lag) until a listing shows the written state
               (used up: the listing is the truth from then on)
    exists     creates answered `Exist` that no listing has shown: never sent again; a
               listing that shows one compares it (update or conflict next round)
    foreign    changes nobody in this invocation made, seen between two listings, to a
               manifest Name or an extra inside the prune scope. Once one is seen, every
               credit still unshown is dropped: another party writes here too, so a Name
               the listing does not show may have been undone, not lag behind. Two syncs
               fighting over one scope thus see each other and end in exit 3, unless one
               of them ends on a listing that shows its manifest.

What remains open (documented): a listing that does not show a credited write cannot tell
lag from another party undoing it when nothing else in the scope moved (a create deleted by
someone else before any listing showed it).

The clock is passed in: `fresh(listed_at, now)` says whether a listing may still be the
source of a delete (FRESH_S).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from worker.api.account import Listed
from worker.api.listed_store import ListedStore, NameOrdered, NameSet, differing

MAX_ROUNDS: Final = 4  # write rounds per invocation: the plan and three corrections
ROUND_PAUSE_S: Final = 2.0  # before each listing after the second: a lagging listing catches up
FRESH_S: Final = 60.0  # a delete is sent only for an extra listed at most this long ago
SHOWN_MAX: Final = 5  # Names an exit-3 message lists before "and N more"
# Names kept in memory as shown differently by two listings (`Convergence.differed`); past
# this the set is dropped and every later check reads the whole manifest (~90 bytes a Name).
DIFFERED_MAX: Final = 50_000


def fresh(listed_at: float, now: float, fresh_s: float = FRESH_S) -> bool:
    """May a listing begun at `listed_at` (monotonic seconds) still be the source of a delete?"""
    return now - listed_at <= fresh_s


def same(a: Listed | None, b: Listed | None) -> bool:
    """Two sightings of a Name show the same state (absent, or project and tag set)."""
    if a is None or b is None:
        return a is b
    return a.project == b.project and a.tag_set == b.tag_set


@dataclass(frozen=True, slots=True)
class Credit:
    before: Listed | None  # the state the write was planned from
    after: Listed | None  # the state written (None: deleted)


class Convergence:
    """The account as one sync invocation knows it, across its listings and writes.

    `view` is kept on disk (listed_store.ListedStore), each Name with the number of the
    listing that last showed it: `shown` is then "listed by listing `shown_from` or later",
    where `shown_from` is the first listing after the last write. Only `credits`, `exists`,
    `settled` and `foreign` are in memory: they hold Names written (or answered) in this run.
    `last` is the caller's: the latest listing, never copied. Close the Convergence (it is a
    context manager) to remove the view's file."""

    def __init__(self, groups: Mapping[str, Listed], *, whole: bool) -> None:
        self.view = ListedStore()
        try:
            self.view.absorb(groups, 1, replace=True)
        except BaseException:
            self.view.close()
            raise
        self.last: Mapping[str, Listed] = groups
        self.shown_from = 1  # the first listing after the last write
        self._written = False  # a write was answered since the last listing
        self.whole = whole  # the view's last listing did not move
        self.credits: dict[str, Credit] = {}
        self.exists: set[str] = set()
        self.settled: set[str] = set()  # rejected or in conflict here: not sent again
        self.foreign: list[str] = []
        self.confirmed = 0  # credits a listing has shown
        self.listings = 1
        # Every Name two successive listings showed differently, for any reason (None: more
        # than DIFFERED_MAX): a manifest line in sync by the first listing and not among these
        # is in sync by the latest too, so a later round need not read it again.
        self.differed: set[str] | None = set()

    def __repr__(self) -> str:
        return (
            f"<Convergence view={len(self.view)} credits={len(self.credits)} "
            f"exists={len(self.exists)} foreign={len(self.foreign)} listings={self.listings}>"
        )

    def __enter__(self) -> Convergence:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.view.close()

    def wrote(self, name: str, before: Listed | None, after: Listed | None) -> None:
        """A write about `name` was answered 2xx (created, updated, deleted)."""
        self.credits[name] = Credit(before, after)
        self._written = True

    def answered_exists(self, name: str) -> None:
        """A create was answered `Exist`: the group is there, its state not yet seen."""
        self.exists.add(name)

    def observe(
        self, groups: Mapping[str, Listed], *, whole: bool, relevant: Container[str]
    ) -> None:
        """Take a listing made after the last write. `relevant`: the Names whose foreign
        changes matter (manifest Names, and extras in the prune scope)."""
        self.listings += 1
        # Only a Name the two listings show differently can be a foreign change: those come
        # from one comparison of the two (differing), not from a lookup per manifest line.
        with differing(self.view, groups) as changed:
            for name in changed:
                self._differed(name)
                if name in self.credits or name in self.exists:
                    continue
                old, new = self.view.get(name), groups.get(name)
                seen_both = old is not None and new is not None
                if (
                    (seen_both or (self.whole and whole))
                    and not same(old, new)
                    and name in relevant
                ):
                    self.foreign.append(name)
        for name, credit in list(self.credits.items()):
            shown = groups.get(name)
            if shown is None and not whole:
                continue  # a moved listing proves no absence: still pending
            if same(shown, credit.after):
                del self.credits[name]
                self.confirmed += 1
            elif not same(shown, credit.before):
                del self.credits[name]  # a third state: someone else wrote it
                self.foreign.append(name)
        self.exists = {name for name in self.exists if name not in groups}
        self.last = groups
        if self._written:
            self.shown_from = self.listings
            self._written = False
        # A listing that did not move replaces the view; a moved one only adds to it.
        self.view.absorb(groups, self.listings, replace=whole)
        self.whole = whole
        if self.foreign:
            self.credits.clear()  # another party writes here: only listings count now

    def _differed(self, name: str) -> None:
        differed = self.differed
        if differed is not None:
            differed.add(name)
            if len(differed) > DIFFERED_MAX:
                self.differed = None

    def shown(self, name: str) -> bool:
        """A listing since the last write showed `name`."""
        listing = self.view.listing_of(name)
        return listing is not None and listing >= self.shown_from

    def unconfirmed(self, name: str) -> bool:
        """No listing since the last write showed `name`, and no write of ours vouches
        for it: its place in the view is hearsay from an older listing."""
        return name not in self.credits and not self.shown(name)

    def effective(self) -> Mapping[str, Listed]:
        """The view with the writes no listing shows yet counted as done."""
        return Effective(self.view, dict(self.credits)) if self.credits else self.view


class Effective(NameOrdered):
    """The view (on disk) overlaid with the credited writes (in memory), read through."""

    def __init__(self, view: Mapping[str, Listed], credits: Mapping[str, Credit]) -> None:
        self._view = view
        self._credits = credits

    def __getitem__(self, name: str) -> Listed:
        credit = self._credits.get(name)
        if credit is None:
            return self._view[name]
        if credit.after is None:
            raise KeyError(name)
        return credit.after

    def __contains__(self, name: object) -> bool:
        credit = self._credits.get(name) if isinstance(name, str) else None
        if credit is None:
            return name in self._view
        return credit.after is not None

    def prefetch(self, names: Sequence[str]) -> None:
        if isinstance(self._view, NameOrdered):
            self._view.prefetch([n for n in names if n not in self._credits])

    def __iter__(self) -> Iterator[str]:
        """In Name order, like the view: the credited Names merged in."""
        added = sorted(n for n, c in self._credits.items() if c.after is not None)
        viewed = (n for n in self._view if n not in self._credits)
        return heapq.merge(viewed, added)

    def __len__(self) -> int:
        # One lookup per credit (this run's writes), never a walk over the view.
        change = 0
        for name, credit in self._credits.items():
            change += (credit.after is not None) - (name in self._view)
        return len(self._view) + change


@dataclass(frozen=True, slots=True)
class Relevant:
    """The Names whose foreign changes matter to a sync (a Container): the manifest's, and
    with --prune (`in_scope` given) those the old or the new listing shows inside the scope."""

    named: NameSet
    old: Mapping[str, Listed]
    new: Mapping[str, Listed]
    in_scope: Callable[[Listed], bool] | None  # --prune's scope; None without --prune

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        if name in self.named:
            return True
        in_scope = self.in_scope
        return in_scope is not None and any(
            listed is not None and in_scope(listed)
            for listed in (self.old.get(name), self.new.get(name))
        )


def still_different(names: list[str], total: int) -> str:
    """`A, B, C and 4 more` for an exit-3 message."""
    shown = ", ".join(names[:SHOWN_MAX])
    return shown if total <= SHOWN_MAX else f"{shown} and {total - SHOWN_MAX} more"
