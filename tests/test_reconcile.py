"""Planning a sync by Name: the plan table, the prune fence, and the plan as text and JSON."""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from worker.api.account import Listed, Tag
from worker.errors import Exit, PlanRefused, Problem, UsageError
from worker.manifest.values import Group, Invalid
from worker.plan.reconcile import (
    NO_PRUNE,
    OUT_OF_SCOPE,
    Conflict,
    Create,
    Delete,
    InSync,
    Keep,
    Scope,
    SeenInSync,
    Update,
    classify_group,
    delete_body,
    in_sync,
    iter_changes,
    plan_sync,
    require_scope,
    update_body,
)
from worker.plan.render import render_json, render_text

A: Tag = ("区域", "华北", "Custom")
B: Tag = ("env", "prod", "System")
C: Tag = ("env", "test", "System")


def group(
    name: str, project: str = "default", tags: list[Tag] | None = None, line: int = 1
) -> Group:
    """A manifest Group exactly as worker.manifest builds it (canonical body, sha256)."""
    body: dict[str, Any] = {"Name": name, "ProjectName": project}
    if tags:
        body["Tags"] = [{"Key": k, "Value": v, "Category": c} for k, v, c in tags]
    raw = orjson.dumps(body)
    return Group(name=name, line=line, body=raw, fingerprint=hashlib.sha256(raw).hexdigest())


def listed(name: str, project: str = "default", tags: list[Tag] | None = None) -> Listed:
    return Listed(name=name, project=project, tags=tuple(tags or ()))


def account_of(*groups: Listed) -> dict[str, Listed]:
    return {g.name: g for g in groups}


SCOPE_P = Scope(projects=frozenset({"p"}))

# manifest group (or None), account group (or None), prune, scope, expected change
TABLE: list[tuple[str, Group | None, Listed | None, bool, Scope, type]] = [
    ("present/absent -> create", group("G1"), None, False, Scope(), Create),
    (
        "same project, same tags -> in sync",
        group("G1", tags=[A, B]),
        listed("G1", tags=[A, B]),
        False,
        Scope(),
        InSync,
    ),
    (
        "tag order does not matter",
        group("G1", tags=[B, A]),
        listed("G1", tags=[A, B]),
        False,
        Scope(),
        InSync,
    ),
    (
        "duplicate manifest tag is one tag",
        group("G1", tags=[A, A]),
        listed("G1", tags=[A]),
        False,
        Scope(),
        InSync,
    ),
    (
        "duplicate listed tag is one tag",
        group("G1", tags=[A]),
        listed("G1", tags=[A, A]),
        False,
        Scope(),
        InSync,
    ),
    ("no tags on either side", group("G1"), listed("G1"), False, Scope(), InSync),
    (
        "other tags -> update",
        group("G1", tags=[A, B]),
        listed("G1", tags=[A, C]),
        False,
        Scope(),
        Update,
    ),
    (
        "manifest has no tags, account has -> update (clear)",
        group("G1"),
        listed("G1", tags=[A]),
        False,
        Scope(),
        Update,
    ),
    (
        "category alone differs -> update",
        group("G1", tags=[("k", "v", "Custom")]),
        listed("G1", tags=[("k", "v", "System")]),
        False,
        Scope(),
        Update,
    ),
    ("other project -> conflict", group("G1", "p1"), listed("G1", "p2"), False, Scope(), Conflict),
    (
        "other project, other tags -> still conflict",
        group("G1", "p1", [A]),
        listed("G1", "p2"),
        False,
        Scope(),
        Conflict,
    ),
    (
        "other project, pruning in scope -> conflict, never delete",
        group("G1", "p1"),
        listed("G1", "p"),
        True,
        SCOPE_P,
        Conflict,
    ),
    ("absent/present, no prune -> kept", None, listed("X1", "p"), False, Scope(), Keep),
    ("absent/present, no prune but a scope -> kept", None, listed("X1", "p"), False, SCOPE_P, Keep),
    ("absent/present, prune in scope -> delete", None, listed("X1", "p"), True, SCOPE_P, Delete),
    ("absent/present, prune outside scope -> kept", None, listed("X1", "q"), True, SCOPE_P, Keep),
]


@pytest.mark.parametrize(
    ("manifest_group", "account_group", "prune", "scope", "expected"),
    [t[1:] for t in TABLE],
    ids=[t[0] for t in TABLE],
)
def test_plan_table(
    manifest_group: Group | None,
    account_group: Listed | None,
    prune: bool,
    scope: Scope,
    expected: type,
) -> None:
    """Every row of the plan table gives its change, counted once in the plan."""
    items = [manifest_group] if manifest_group else []
    account = account_of(account_group) if account_group else {}
    plan = plan_sync(items, account, prune=prune, scope=scope)
    changes = list(iter_changes(plan, items, account))
    assert [type(c) for c in changes] == [expected]
    key = {
        Create: "create",
        Update: "update",
        Conflict: "conflict",
        InSync: "in_sync",
        Delete: "delete",
        Keep: "keep",
    }[expected]
    assert plan.counts[key] == 1
    assert sum(v for k, v in plan.counts.items() if k not in ("listed", "invalid")) == 1


def test_update_carries_the_tag_difference_sorted() -> None:
    """An update names the tags to add and to remove, as sets, in a stable order."""
    change = classify_group(group("G1", tags=[B, A, A]), account_of(listed("G1", tags=[C, A])))
    assert isinstance(change, Update)
    assert change.added == (B,) and change.removed == (C,)
    cleared = classify_group(group("G1"), account_of(listed("G1", tags=[C, A])))
    assert isinstance(cleared, Update) and cleared.added == () and cleared.removed == (C, A)


def test_conflict_reports_both_projects() -> None:
    """A conflict holds the manifest's and the account's ProjectName."""
    change = classify_group(group("G1", "新项目"), account_of(listed("G1", "old")))
    assert isinstance(change, Conflict)
    assert change.manifest_project == "新项目" and change.listed.project == "old"


def test_update_and_delete_bodies_are_canonical() -> None:
    """Update sends the manifest's tags whole (`[]` to clear); delete sends only the Name."""
    assert (
        update_body(group("华北01", "p", [A, B]))
        == (
            '{"Name":"华北01","Tags":[{"Key":"区域","Value":"华北","Category":"Custom"},'
            '{"Key":"env","Value":"prod","Category":"System"}]}'
        ).encode()
    )
    assert update_body(group("G1", "p")) == b'{"Name":"G1","Tags":[]}'
    assert delete_body("华北01") == '{"Name":"华北01"}'.encode()


# --- the prune fence ---------------------------------------------------------------------

SCOPES = [
    # projects, match, (name, project) -> in scope?
    ({"p"}, None, ("X1", "p"), True),
    ({"p"}, None, ("X1", "q"), False),
    ({"p", "q"}, None, ("X1", "q"), True),
    (set(), r"tmp\d+", ("tmp12", "any"), True),
    (set(), r"tmp\d+", ("tmp12x", "any"), False),  # the WHOLE Name must match
    (set(), r"tmp", ("mytmp", "any"), False),  # not a search
    (set(), r"tmp", ("tmp2", "any"), False),
    ({"p"}, r"tmp.*", ("tmp1", "p"), True),  # both given: both hold
    ({"p"}, r"tmp.*", ("tmp1", "q"), False),  # right name, wrong project
    ({"p"}, r"tmp.*", ("prod1", "p"), False),  # right project, wrong name
    (set(), None, ("X1", "p"), False),  # no scope contains nothing
]


@pytest.mark.parametrize(("projects", "match", "group_", "inside"), SCOPES)
def test_scope_combinations(
    projects: set[str], match: str | None, group_: tuple[str, str], inside: bool
) -> None:
    """Each criterion given must hold; --scope-match is a full match of the Name."""
    scope = Scope.from_flags(projects, match)
    assert scope.contains(listed(group_[0], group_[1])) is inside


def test_scope_flags_are_checked() -> None:
    """A bad regex, an empty pattern or an empty project is a usage error naming the flag."""
    with pytest.raises(
        UsageError, match="--scope-match '\\(' is not a valid regular expression"
    ) as err:
        Scope.from_flags([], "(")
    assert err.value.exit_code == Exit.USAGE
    with pytest.raises(UsageError, match="--scope-project must not be empty"):
        Scope.from_flags([""], None)
    # An empty pattern would be a scope that matches no Name: a silent no-op prune.
    with pytest.raises(UsageError, match="--scope-match must not be empty"):
        Scope.from_flags([], "")
    assert not Scope.from_flags([], None).given and Scope.from_flags([], "x").given


def test_prune_without_scope_is_refused_naming_the_flags() -> None:
    """--prune without a scope is PlanRefused (exit 2) naming the flags; checkable up front."""
    for call in (
        lambda: require_scope(True, Scope()),
        lambda: plan_sync([], account_of(listed("X1")), prune=True),
    ):
        with pytest.raises(PlanRefused) as err:
            call()
        assert err.value.exit_code == Exit.USAGE
        assert all(
            flag in str(err.value) for flag in ("--prune", "--scope-project", "--scope-match")
        )
    require_scope(False, Scope())  # no prune: no scope needed


@pytest.mark.parametrize(
    ("extras", "max_delete", "refused"),
    [
        (3, 3, False),  # exactly N is allowed
        (4, 3, True),  # N + 1 is refused
        (0, 0, False),
        (1, 0, True),
        (50, 50, False),  # the default
        (51, 50, True),
    ],
)
def test_max_delete_boundary(extras: int, max_delete: int, refused: bool) -> None:
    """Exactly --max-delete deletes go ahead; one more refuses the whole plan, naming both."""
    account = account_of(*(listed(f"X{i}", "p") for i in range(extras)), listed("G1", "p"))
    items = [group("G1", "p")]
    kwargs: dict[str, Any] = {"prune": True, "scope": SCOPE_P}
    if max_delete != 50:
        kwargs["max_delete"] = max_delete
    if refused:
        with pytest.raises(PlanRefused) as err:
            plan_sync(items, account, **kwargs)
        assert f"delete {extras} groups" in str(err.value) and f"--max-delete {max_delete}" in str(
            err.value
        )
        assert err.value.exit_code == Exit.USAGE
    else:
        plan = plan_sync(items, account, **kwargs)
        assert [d.name for d in plan.deletes] == sorted(f"X{i}" for i in range(extras))


def test_out_of_scope_extras_do_not_count_against_max_delete() -> None:
    """Only extras inside the scope are deletes; the rest are kept and not counted."""
    account = account_of(*(listed(f"X{i}", "q") for i in range(10)), listed("Y1", "p"))
    plan = plan_sync([], account, prune=True, scope=SCOPE_P, max_delete=1)
    assert [d.name for d in plan.deletes] == ["Y1"]
    assert plan.keep_why == OUT_OF_SCOPE and plan.kept == 10
    kept = [c.listed.name for c in iter_changes(plan, [], account) if isinstance(c, Keep)]
    assert kept == sorted(f"X{i}" for i in range(10))


def test_a_group_named_in_the_manifest_is_never_deleted() -> None:
    """Whatever the manifest says about a Name it gives (other project, other tags, even an
    invalid line naming it), pruning with a scope that covers everything never deletes it."""
    account = account_of(
        listed("G1", "p"),
        listed("G2", "other"),
        listed("G3", "p", [A]),
        listed("G4", "p"),
        listed("X1", "p"),
    )
    everything = Scope.from_flags([], ".*")
    bad = Invalid(line=4, name="G4", problem=Problem("m.jsonl", 4, "Tags", "must be a list"))
    items: list[Group | Invalid] = [group("G1", "p"), group("G2", "p"), group("G3", "p"), bad]
    plan = plan_sync(items, account, prune=True, scope=everything)
    assert [d.name for d in plan.deletes] == ["X1"]
    assert plan.invalid == 1 and plan.conflict == 1 and plan.update == 1 and plan.in_sync == 1


def test_never_deletes_a_manifest_name_over_random_plans() -> None:
    """Over many random manifests and accounts, deletes are exactly the in-scope extras."""
    rng = random.Random(0)
    names = [f"G{i}" for i in range(40)]
    for _ in range(200):
        in_manifest = set(rng.sample(names, rng.randint(0, 40)))
        in_account = set(rng.sample(names, rng.randint(0, 40)))
        account = account_of(
            *(
                listed(n, rng.choice(["p", "q"]), rng.sample([A, B, C], rng.randint(0, 3)))
                for n in in_account
            )
        )
        items = [
            group(n, rng.choice(["p", "q"]), rng.sample([A, B, C], rng.randint(0, 3)))
            for n in in_manifest
        ]
        scope = Scope.from_flags(rng.choice([[], ["p"]]), rng.choice([None, r"G[0-2]\d?"]))
        if not scope.given:
            scope = SCOPE_P
        plan = plan_sync(items, account, prune=True, scope=scope, max_delete=40)
        deleted = {d.name for d in plan.deletes}
        assert not deleted & in_manifest
        assert deleted == {n for n in in_account - in_manifest if scope.contains(account[n])}
        assert plan.create == len(in_manifest - in_account)


def test_plan_streams_the_manifest_once() -> None:
    """plan_sync takes a one-shot iterator: one pass over the manifest, nothing held back."""

    def stream() -> Iterator[Group]:
        yield from (group(f"G{i}") for i in range(1000))

    account = account_of(listed("G1"), listed("X1"))
    plan = plan_sync(stream(), account)
    assert plan.create == 999 and plan.in_sync == 1 and plan.kept == 1
    kept = [c.listed.name for c in iter_changes(plan, stream(), account) if isinstance(c, Keep)]
    assert kept == ["X1"]


def test_what_was_seen_in_sync_never_changes_an_answer() -> None:
    """classify_group with a SeenInSync shared over a pass answers exactly as without it,
    over random groups sharing few projects and tag sets (Names that look like JSON too)."""
    rng = random.Random(7)
    tags = [[], [A], [("k", "1", "Custom")], [A, ("k", "1", "Custom")], [("k", "2", "System")]]
    names = ['G,"ProjectName":"p"', "G", 'q"', "组"]
    seen = SeenInSync()
    for i in range(3000):
        name = f"{rng.choice(names)}{i}"
        mine = group(name, rng.choice(["p", "q"]), rng.choice(tags), line=i + 1)
        account = {}
        if rng.random() < 0.9:
            account[name] = listed(name, rng.choice(["p", "q"]), rng.choice(tags))
        plain = classify_group(mine, account)
        assert classify_group(mine, account, seen=seen) == plain
        shuffled = dict(account)
        if name in shuffled:  # the same tags in another order: still the same answer
            got = shuffled[name]
            shuffled[name] = Listed(name=name, project=got.project, tags=got.tags[::-1])
            assert type(classify_group(mine, shuffled, seen=seen)) is type(plain)


def test_the_plan_says_where_the_last_change_is() -> None:
    """last_change: the last line that is not in sync (a change of any kind, or an invalid
    line, which is reported); 0 when every line is. A sync's first writes pass stops there."""
    account = account_of(*(listed(f"G{i}") for i in range(1, 9)))
    in_sync = [group(f"G{i}", line=i) for i in range(1, 9)]
    assert plan_sync(iter(in_sync), account).last_change == 0
    problem = Problem("m.jsonl", 3, "Tags", "must be a list")
    for changed, line in (
        (group("G3", tags=[A], line=3), 3),  # an update
        (group("G9", line=9), 9),  # a create
        (group("G5", "p", line=5), 5),  # a conflict
        (Invalid(line=3, name="G3", problem=problem), 3),
    ):
        items = [changed if g.line == changed.line else g for g in in_sync]
        items += [changed] if changed.line > 8 else []
        assert plan_sync(iter(items), account).last_change == line, changed
    items = [group("G1", tags=[A], line=1), *in_sync[1:6], group("G7", "p", line=7), in_sync[7]]
    assert plan_sync(iter(items), account).last_change == 7


@pytest.mark.parametrize(
    ("manifest", "account", "prune", "expected"),
    [
        ([group("G1")], [listed("G1")], False, True),
        (
            [group("G1")],
            [listed("G1"), listed("X1", "p")],
            False,
            True,
        ),  # extras ignored without prune
        ([group("G1")], [listed("G1"), listed("X1", "p")], True, False),  # ...and count with it
        (
            [group("G1")],
            [listed("G1"), listed("X1", "q")],
            True,
            True,
        ),  # outside the scope: not ours
        ([group("G1")], [], False, False),  # a create
        ([group("G1", tags=[A])], [listed("G1")], False, False),  # an update
        ([group("G1", "p")], [listed("G1", "q")], False, False),  # a conflict is drift
    ],
)
def test_in_sync_for_check(
    manifest: list[Group], account: list[Listed], prune: bool, expected: bool
) -> None:
    """--check: in sync when nothing is to create, update or resolve (extras only with prune)."""
    plan = plan_sync(
        manifest, account_of(*account), prune=prune, scope=SCOPE_P if prune else Scope()
    )
    assert in_sync(plan, prune) is expected


# --- plan output -------------------------------------------------------------------------


def sample() -> tuple[list[Group], dict[str, Listed]]:
    items = [group("G1", "p"), group("G2", "p", [A, B]), group("G3", "p"), group("G4", "p", [B])]
    account = account_of(
        listed("G2", "p", [A, C]),
        listed("G3", "q"),
        listed("G4", "p", [B]),
        listed("X1", "p"),
        listed("Y1", "r r"),
    )
    return items, account


def test_render_text_counts_then_one_line_per_change() -> None:
    """Text plan (-v): counts first, then +, ~ with the tag difference, ! with both projects,
    -, and ? for each kept extra."""
    items, account = sample()
    plan = plan_sync(items, account, prune=True, scope=SCOPE_P)
    lines = list(render_text(plan, iter_changes(plan, items, account), list_kept=True))
    assert lines == [
        "sync plan: 1 to create, 1 to update, 1 in conflict, 1 to delete, 1 extra kept, 1 in sync (5 listed)",
        "+ G1",
        "~ G2  tags: +env=prod/System, -env=test/System",
        "! G3  project: manifest p, account q (a project cannot be changed)",
        "- X1  (project p)",
        f'? Y1  (project "r r") {OUT_OF_SCOPE}',
    ]


def test_render_text_counts_kept_extras_in_one_line() -> None:
    """Without -v the kept extras are one counted `?` line, not a line each."""
    items, account = sample()
    account = {**account, "Y2": listed("Y2", project="r r")}
    plan = plan_sync(items, account, prune=True, scope=SCOPE_P)
    lines = list(render_text(plan, iter_changes(plan, items, account)))
    assert lines[-1] == f"? 2 extras {OUT_OF_SCOPE} (-v lists them)"
    assert not any(line.startswith("? Y") for line in lines)


def test_render_text_quotes_what_would_break_a_line() -> None:
    """Tags with newlines or separators are shown JSON-quoted: one change stays one line."""
    items = [group("G1", tags=[("a=b", "x\ny", "Custom")])]
    plan = plan_sync(items, account_of(listed("G1")))
    lines = list(render_text(plan, iter_changes(plan, items, account_of(listed("G1")))))
    assert lines[1] == '~ G1  tags: +"a=b"="x\\ny"/Custom' and len(lines) == 2


def test_render_json_is_one_object_with_counts_and_changes() -> None:
    """JSON plan: counts and a list per kind, serializable as one object."""
    items, account = sample()
    plan = plan_sync(items, account)
    out = render_json(plan, iter_changes(plan, items, account))
    assert orjson.loads(orjson.dumps(out)) == {
        "prune": False,
        "counts": {
            "listed": 5,
            "create": 1,
            "update": 1,
            "conflict": 1,
            "replace": 0,
            "in_sync": 1,
            "delete": 0,
            "keep": 2,
            "invalid": 0,
        },
        "create": [{"Name": "G1", "ProjectName": "p"}],
        "update": [
            {
                "Name": "G2",
                "ProjectName": "p",
                "added": [{"Key": "env", "Value": "prod", "Category": "System"}],
                "removed": [{"Key": "env", "Value": "test", "Category": "System"}],
            }
        ],
        "conflict": [{"Name": "G3", "manifest_project": "p", "account_project": "q"}],
        "replace": [],
        "delete": [],
        "keep": [
            {"Name": "X1", "ProjectName": "p", "why": "no_prune"},
            {"Name": "Y1", "ProjectName": "r r", "why": "no_prune"},
        ],
    }
    assert plan.keep_why == NO_PRUNE


def test_scope_from_flags_compiles_the_pattern() -> None:
    """The scope keeps the compiled pattern and the projects as given."""
    scope = Scope.from_flags(["a", "b", "a"], "x+")
    assert scope.projects == frozenset({"a", "b"}) and scope.match == re.compile("x+")
