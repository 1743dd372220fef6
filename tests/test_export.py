"""Export: the listed account as a manifest that `validate` accepts and `sync` finds in sync."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.api.account import Listed, Listing
from worker.manifest import source, spool
from worker.manifest.values import Group
from worker.plan.export import export_lines
from worker.plan.reconcile import in_sync, plan_sync


def test_export_lines_sorted_canonical_and_filtered() -> None:
    """One line per group sorted by Name; Tags sorted, once each, left out when empty."""
    groups = [
        Listed(
            name="b2",
            project="p",
            tags=(("k", "2", "System"), ("k", "1", "Custom"), ("k", "2", "System")),
        ),
        Listed(name="A1", project="q"),
        Listed(name="华北", project="p", tags=()),
    ]
    assert export_lines(groups, None) == [
        b'{"Name":"A1","ProjectName":"q"}\n',
        b'{"Name":"b2","ProjectName":"p","Tags":[{"Key":"k","Value":"1","Category":"Custom"},'
        b'{"Key":"k","Value":"2","Category":"System"}]}\n',
        '{"Name":"华北","ProjectName":"p"}\n'.encode(),
    ]
    assert [line[:14] for line in export_lines(groups, frozenset({"p"}))] == [
        b'{"Name":"b2","',
        '{"Name":"华北"'.encode()[:14],
    ]
    assert export_lines(groups, frozenset({"none"})) == [] and export_lines([], None) == []


def test_export_is_deterministic_whatever_the_listing_order() -> None:
    """The same account exports the same bytes, however List ordered groups and tags."""
    one = [
        Listed(name="A1", project="p", tags=(("x", "1", "Custom"), ("a", "2", "System"))),
        Listed(name="B1", project="p"),
    ]
    two = [
        Listed(name="B1", project="p"),
        Listed(name="A1", project="p", tags=(("a", "2", "System"), ("x", "1", "Custom"))),
    ]
    assert export_lines(one, None) == export_lines(two, None)


def listed_account() -> dict[str, Listed]:
    """An account as the real listing path builds it: JSON pages through Listing."""
    items: list[dict[str, Any]] = [
        {
            "Name": "华北直播群组01",
            "ProjectName": "直播一部",
            "Status": 0,
            "Tags": [
                {"Category": "Custom", "Key": "区域", "Value": "华北"},
                {"Category": "System", "Key": "env", "Value": 'prod, "quoted"\n'},
            ],
        },
        {"Name": "Relay2", "ProjectName": "default", "Status": 0, "Tags": []},
        {"Name": "relay1", "ProjectName": "p q", "Status": 0, "Tags": None},
        {
            "Name": "Z9",
            "ProjectName": "default",
            "Status": 0,
            "Tags": [{"Category": "Custom", "Key": "", "Value": ""}],
        },
    ]
    listing = Listing(page_size=3)
    while (body := listing.next_request()) is not None:
        start = (body["PageNum"] - 1) * 3
        listing.add_result({"List": items[start : start + 3], "Total": len(items)})
    return dict(listing.groups)


def test_export_round_trips_through_validate_and_sync(tmp_path: Path) -> None:
    """Exported lines pass the manifest parser unchanged, and a sync of that manifest against
    the same account plans nothing at all: names, projects and tags all survive."""
    account = listed_account()
    path = tmp_path / "export.jsonl"
    path.write_bytes(b"".join(export_lines(account.values(), None)))
    with source.scan(path) as scanned:
        assert scanned.problem_count == 0 and scanned.groups == len(account)
        groups = [g for g in spool.read(scanned) if isinstance(g, Group)]
    assert [g.name for g in groups] == sorted(account)
    for g in groups:
        listed = account[g.name]
        payload = g.payload
        assert payload["ProjectName"] == listed.project
        assert {
            (t["Key"], t["Value"], t["Category"]) for t in payload.get("Tags", [])
        } == listed.tag_set
    plan = plan_sync(groups, account)
    assert in_sync(plan, prune=False) and plan.in_sync == len(account) and not plan.kept
