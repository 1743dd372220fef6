"""The sandbox at the HTTP level: every behaviour, over real loopback sockets; its window,
service history and state file as units with an injected clock."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest

from worker.api import spec
from worker.api.signing import Credentials, sign
from worker.errors import UsageError
from worker.sandbox import Running, SandboxConfig, serve
from worker.sandbox.app import SandboxApp
from worker.sandbox.envelope import ApiError
from worker.sandbox.service import Service
from worker.sandbox.store import Stored
from worker.sandbox.window import SlidingWindow

T = TypeVar("T")
KEYS = {"AKSB": "SKsandbox"}
GOOD = Credentials(access_key="AKSB", secret_key="SKsandbox")
TAG = {"Key": "k", "Value": "v", "Category": "Custom"}
# A window no test can outlast: counting is then independent of how fast the machine is.
LONG_WINDOW = 600.0


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes


def arun(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


async def call(
    sb: Running,
    action: str,
    body: Any,
    *,
    creds: Credentials = GOOD,
    now: datetime | None = None,
    version: str = spec.VERSION,
    region: str = "cn-north-1",
    edit: Callable[[dict[str, str]], None] | None = None,
    raw: bytes | None = None,
    timeout: float = 5.0,
) -> Reply | str:
    """One signed request; the answer, or "disconnected" / "timeout" when none came."""
    data = raw if raw is not None else orjson.dumps(body)
    query = {"Action": action, "Version": version}
    headers = sign(
        method="POST",
        host=urlsplit(sb.url).netloc,
        path="/",
        query=query,
        content_type="application/json",
        body=data,
        credentials=creds,
        region=region,
        now=now or datetime.now(UTC),
    )
    if edit is not None:
        edit(headers)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        try:
            async with session.post(
                sb.url + "/", params=query, data=data, headers=headers, allow_redirects=False
            ) as resp:
                return Reply(resp.status, await resp.read())
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError):
            return "disconnected"
        except TimeoutError:
            return "timeout"


def code_of(resp: Reply | str) -> tuple[int, str]:
    assert isinstance(resp, Reply), resp
    meta = orjson.loads(resp.body)["ResponseMetadata"]
    return resp.status, meta.get("Error", {}).get("Code", "")


def kind_of(resp: Reply | str) -> str:
    return code_of(resp)[1] if isinstance(resp, Reply) else resp


def result_of(resp: Reply | str) -> dict[str, Any]:
    assert code_of(resp) == (200, ""), resp
    assert isinstance(resp, Reply)
    result: dict[str, Any] = orjson.loads(resp.body)["Result"]
    return result


def with_sandbox(test: Callable[[Running], Awaitable[None]], **config: Any) -> None:
    config.setdefault("keys", KEYS)

    async def main() -> None:
        async with serve(SandboxConfig(**config)) as sb:
            await test(sb)

    asyncio.run(main())


async def _state(sb: Running) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(sb.url + "/_sandbox/state") as resp:
        data: dict[str, Any] = await resp.json()
    return data


async def _groups(sb: Running) -> dict[str, dict[str, Any]]:
    return {g["Name"]: g for g in (await _state(sb))["groups"]}


async def _list(sb: Running, **body: Any) -> dict[str, Any]:
    return result_of(await call(sb, spec.LIST, {"PageNum": 1, "PageSize": 1000, **body}))


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# -- create, envelopes, gateway ------------------------------------------------------------


def test_create_list_update_delete() -> None:
    """The four actions with their documented envelopes; a second create answers Exist."""

    async def t(sb: Running) -> None:
        body = {"Name": "华北群组1", "ProjectName": "default", "Tags": [TAG]}
        resp = await call(sb, spec.CREATE, body)
        assert code_of(resp) == (200, "")
        assert isinstance(resp, Reply)
        meta = orjson.loads(resp.body)["ResponseMetadata"]
        assert (
            meta["Action"] == spec.CREATE and meta["RequestId"] and meta["Region"] == "cn-north-1"
        )
        assert "Result" not in orjson.loads(resp.body)
        assert code_of(await call(sb, spec.CREATE, body)) == (429, "RequestLimitExceeded.Exist")
        result = await _list(sb)
        assert result == {
            "Total": 1,
            "List": [{"Name": "华北群组1", "ProjectName": "default", "Status": 0, "Tags": [TAG]}],
        }
        new_tags = [{"Key": "a", "Value": "b", "Category": "System"}]
        assert code_of(await call(sb, spec.UPDATE, {"Name": "华北群组1", "Tags": new_tags})) == (
            200,
            "",
        )
        assert code_of(await call(sb, spec.DELETE, {"Name": "华北群组1"})) == (200, "")
        deleted = await _list(sb, StatusList=[1])
        assert deleted["List"][0]["Status"] == 1 and deleted["List"][0]["Tags"] == new_tags
        assert code_of(await call(sb, spec.DELETE, {"Name": "nope"})) == (404, "ResourceNotFound")

    with_sandbox(t, rate=100)


def test_unknown_action_or_version() -> None:
    """Unknown actions and versions answer 404 InvalidActionOrVersion."""

    async def t(sb: Running) -> None:
        assert code_of(await call(sb, "CreateSomething", {})) == (404, "InvalidActionOrVersion")
        assert code_of(await call(sb, spec.CREATE, {"Name": "a"}, version="2020-01-01")) == (
            404,
            "InvalidActionOrVersion",
        )

    with_sandbox(t)


def test_authentication_errors() -> None:
    """Each way a signature can be wrong gets its own documented code and status."""

    async def t(sb: Running) -> None:
        body = {"Name": "A1"}

        def drop_auth(h: dict[str, str]) -> None:
            del h["Authorization"]

        assert code_of(await call(sb, spec.CREATE, body, edit=drop_auth)) == (
            401,
            "MissingAuthenticationToken",
        )
        assert code_of(
            await call(
                sb, spec.CREATE, body, creds=Credentials(access_key="AKNOPE", secret_key="x")
            )
        ) == (401, "InvalidAccessKey")
        assert code_of(
            await call(
                sb, spec.CREATE, body, creds=Credentials(access_key="AKSB", secret_key="wrong")
            )
        ) == (401, "SignatureDoesNotMatch")
        assert code_of(await call(sb, spec.CREATE, body, region="cn-beijing")) == (
            401,
            "SignatureDoesNotMatch",
        )

        def wrong_hash(h: dict[str, str]) -> None:
            h["X-Content-Sha256"] = "0" * 64

        assert code_of(await call(sb, spec.CREATE, body, edit=wrong_hash)) == (
            401,
            "SignatureDoesNotMatch",
        )

        def unsigned_token(h: dict[str, str]) -> None:
            h["X-Security-Token"] = "smuggled"

        assert code_of(await call(sb, spec.CREATE, body, edit=unsigned_token)) == (
            401,
            "SignatureDoesNotMatch",
        )
        stale = datetime.now(UTC) - timedelta(minutes=16)
        assert code_of(await call(sb, spec.CREATE, body, now=stale)) == (400, "InvalidTimestamp")
        near = datetime.now(UTC) - timedelta(minutes=14)
        assert code_of(await call(sb, spec.CREATE, body, now=near)) == (200, "")
        sts = Credentials(access_key="AKSB", secret_key="SKsandbox", session_token="STS-token")
        assert code_of(await call(sb, spec.CREATE, {"Name": "A2"}, creds=sts)) == (200, "")
        assert list(await _groups(sb)) == ["A1", "A2"]

    with_sandbox(t, rate=100)


def test_body_validation() -> None:
    """Body rules answer InvalidParam; wrong JSON types answer InvalidParam.BindError."""

    async def t(sb: Running) -> None:
        cases = [
            ({"Name": ""}, "InvalidParam"),
            ({"Name": "a" * 21}, "InvalidParam"),
            ({"Name": "with-dash"}, "InvalidParam"),
            ({"Name": "１２"}, "InvalidParam"),
            ({"ProjectName": "default"}, "InvalidParam"),
            (
                {"Name": "ok1", "Tags": [{"Key": "k", "Value": "v", "Category": "custom"}]},
                "InvalidParam",
            ),
            ({"Name": 12}, "InvalidParam.BindError"),
            ({"Name": "ok2", "ProjectName": 3}, "InvalidParam.BindError"),
            ({"Name": "ok3", "Tags": {"Key": "k"}}, "InvalidParam.BindError"),
            (
                {"Name": "ok4", "Tags": [{"Key": 1, "Value": "v", "Category": "Custom"}]},
                "InvalidParam.BindError",
            ),
        ]
        for body, code in cases:
            assert code_of(await call(sb, spec.CREATE, body)) == (400, code), body
        assert code_of(await call(sb, spec.CREATE, None, raw=b"{not json")) == (
            400,
            "InvalidParam.BindError",
        )
        assert (await _state(sb))["groups"] == []

    with_sandbox(t, rate=100)


# -- the rate window -----------------------------------------------------------------------


def test_window_boundary_with_injected_clock() -> None:
    """Strict sliding window: the (rate+1)-th arrival inside 1 s is refused, and admitted
    again exactly once the oldest arrival is a full second old; per access key."""
    clock = FakeClock(10.0)
    window = SlidingWindow(rate=3, window_s=1.0, clock=clock)
    for now in (10.0, 10.2, 10.4):
        clock.t = now
        assert window.admit("AKSB")
    clock.t = 10.999
    assert not window.admit("AKSB")
    clock.t = 11.0  # 10.0 has left the window (10.0 <= 11.0 - 1)
    assert window.admit("AKSB")
    clock.t = 11.1
    assert not window.admit("AKSB")
    assert window.admit("AKOTHER")
    assert "held={'AKSB': 3, 'AKOTHER': 1}" in repr(window)


def test_window_refusals_do_not_count() -> None:
    """A refused arrival takes no place in the window: knocking does not prolong the wait."""
    clock = FakeClock(0.0)
    window = SlidingWindow(rate=1, window_s=1.0, clock=clock)
    assert window.admit("A")
    for i in range(1, 10):
        clock.t = i / 10
        assert not window.admit("A")
    clock.t = 1.0
    assert window.admit("A")


def test_burst_is_throttled_and_changes_nothing() -> None:
    """Over the window: 429 FlowLimitExceeded, and the refused creates change nothing."""

    async def t(sb: Running) -> None:
        results = await asyncio.gather(
            *(call(sb, spec.CREATE, {"Name": f"B{i}"}) for i in range(6))
        )
        codes = sorted(code_of(r)[1] for r in results)
        assert codes == ["", "", "", "FlowLimitExceeded", "FlowLimitExceeded", "FlowLimitExceeded"]
        assert len((await _state(sb))["groups"]) == 3

    with_sandbox(t, rate=3, window_s=LONG_WINDOW)


def test_rate_window_is_shared_by_all_four_actions() -> None:
    """Create, List, Update and Delete draw on one window per access key."""

    async def t(sb: Running) -> None:
        assert code_of(await call(sb, spec.CREATE, {"Name": "W1"})) == (200, "")
        assert code_of(await call(sb, spec.LIST, {"PageNum": 1, "PageSize": 10})) == (200, "")
        assert code_of(await call(sb, spec.UPDATE, {"Name": "W1", "Tags": []})) == (200, "")
        assert code_of(await call(sb, spec.DELETE, {"Name": "W1"})) == (200, "")
        for action, body in [
            (spec.LIST, {"PageNum": 1, "PageSize": 10}),
            (spec.CREATE, {"Name": "W2"}),
            (spec.DELETE, {"Name": "W1"}),
            (spec.UPDATE, {"Name": "W1", "Tags": []}),
        ]:
            assert code_of(await call(sb, action, body)) == (429, "FlowLimitExceeded"), action
        assert (await _groups(sb))["W1"]["deleted"] == 1

    with_sandbox(t, rate=4, window_s=LONG_WINDOW)


# -- List ----------------------------------------------------------------------------------


def test_list_paging_bounds_and_types() -> None:
    """PageNum and PageSize: integers in 1-1000 (bools are not); StatusList: 0 and/or 1."""

    async def t(sb: Running) -> None:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"PageNum": 0, "PageSize": 10}, "InvalidParam"),
            ({"PageNum": 1001, "PageSize": 10}, "InvalidParam"),
            ({"PageNum": 1, "PageSize": 0}, "InvalidParam"),
            ({"PageNum": 1, "PageSize": 1001}, "InvalidParam"),
            ({"PageSize": 10}, "InvalidParam"),
            ({"PageNum": 1}, "InvalidParam"),
            ({"PageNum": "1", "PageSize": 10}, "InvalidParam.BindError"),
            ({"PageNum": 1, "PageSize": 10.0}, "InvalidParam.BindError"),
            ({"PageNum": True, "PageSize": 10}, "InvalidParam.BindError"),
            ({"PageNum": 1, "PageSize": 10, "StatusList": [2]}, "InvalidParam"),
            ({"PageNum": 1, "PageSize": 10, "StatusList": []}, "InvalidParam"),
            ({"PageNum": 1, "PageSize": 10, "StatusList": 0}, "InvalidParam.BindError"),
            ({"PageNum": 1, "PageSize": 10, "StatusList": ["0"]}, "InvalidParam.BindError"),
            ({"PageNum": 1, "PageSize": 10, "StatusList": [False]}, "InvalidParam.BindError"),
        ]
        for body, code in cases:
            assert code_of(await call(sb, spec.LIST, body)) == (400, code), body
        for body in (
            {"PageNum": 1000, "PageSize": 1000},
            {"PageNum": 1, "PageSize": 1},
            {"PageNum": 1, "PageSize": 1, "StatusList": [0, 1]},
        ):
            assert code_of(await call(sb, spec.LIST, body)) == (200, ""), body

    with_sandbox(t, rate=1000)


def test_list_pages_in_creation_order_with_total_per_status(tmp_path: Path) -> None:
    """Pages follow creation order; Total counts the groups the StatusList selects; deleted
    groups show only with StatusList [1]."""

    async def t(sb: Running) -> None:
        for i in range(5):
            assert code_of(await call(sb, spec.CREATE, {"Name": f"P{i}"})) == (200, "")
        pages = [
            result_of(await call(sb, spec.LIST, {"PageNum": n, "PageSize": 2}))
            for n in (1, 2, 3, 4)
        ]
        assert [[g["Name"] for g in p["List"]] for p in pages] == [
            ["P0", "P1"],
            ["P2", "P3"],
            ["P4"],
            [],
        ]
        assert {p["Total"] for p in pages} == {5}
        assert code_of(await call(sb, spec.DELETE, {"Name": "P1"})) == (200, "")
        available = await _list(sb)
        assert available["Total"] == 4 and "P1" not in [g["Name"] for g in available["List"]]
        gone = await _list(sb, StatusList=[1])
        assert gone["Total"] == 1 and gone["List"][0] == {
            "Name": "P1",
            "ProjectName": "default",
            "Status": 1,
            "Tags": [],
        }
        both = await _list(sb, StatusList=[0, 1])
        assert [g["Name"] for g in both["List"]] == ["P0", "P1", "P2", "P3", "P4"]

    with_sandbox(t, rate=1000)


# -- Update and Delete ---------------------------------------------------------------------


def test_update_replaces_tags_whole_and_needs_an_available_group() -> None:
    """Update replaces the tags whole (`[]` clears them); an absent or deleted Name is 404
    ResourceNotFound; Tags are required; each carried-out update is counted."""

    async def t(sb: Running) -> None:
        two = [TAG, {"Key": "k2", "Value": "v2", "Category": "System"}]
        assert code_of(await call(sb, spec.CREATE, {"Name": "U1", "Tags": two})) == (200, "")
        assert code_of(await call(sb, spec.UPDATE, {"Name": "U1", "Tags": [TAG]})) == (200, "")
        assert (await _list(sb))["List"][0]["Tags"] == [TAG]
        assert code_of(await call(sb, spec.UPDATE, {"Name": "U1", "Tags": []})) == (200, "")
        assert (await _list(sb))["List"][0]["Tags"] == []
        assert code_of(await call(sb, spec.UPDATE, {"Name": "U1"})) == (400, "InvalidParam")
        assert code_of(await call(sb, spec.UPDATE, {"Name": "U1", "Tags": [{"Key": "k"}]})) == (
            400,
            "InvalidParam",
        )
        assert code_of(await call(sb, spec.UPDATE, {"Name": "Absent", "Tags": []})) == (
            404,
            "ResourceNotFound",
        )
        assert code_of(await call(sb, spec.UPDATE, {"Name": "bad-name", "Tags": []})) == (
            400,
            "InvalidParam",
        )
        assert code_of(await call(sb, spec.DELETE, {"Name": "U1"})) == (200, "")
        assert code_of(await call(sb, spec.UPDATE, {"Name": "U1", "Tags": [TAG]})) == (
            404,
            "ResourceNotFound",
        )
        group = (await _groups(sb))["U1"]
        assert (group["updated"], group["deleted"], group["Tags"]) == (2, 1, [])

    with_sandbox(t, rate=1000)


def test_delete_twice_is_resource_not_found_and_counted_once() -> None:
    """Delete sets Status 1; a second delete, or one of a Name never created, is 404."""

    async def t(sb: Running) -> None:
        assert code_of(await call(sb, spec.CREATE, {"Name": "D1"})) == (200, "")
        assert code_of(await call(sb, spec.DELETE, {"Name": "D1"})) == (200, "")
        assert code_of(await call(sb, spec.DELETE, {"Name": "D1"})) == (404, "ResourceNotFound")
        assert code_of(await call(sb, spec.DELETE, {"Name": "D2"})) == (404, "ResourceNotFound")
        assert code_of(await call(sb, spec.DELETE, {})) == (400, "InvalidParam")
        group = (await _groups(sb))["D1"]
        assert (group["Status"], group["deleted"], group["created"]) == (1, 1, 1)
        assert "D2" not in await _groups(sb)

    with_sandbox(t, rate=1000)


def test_create_of_a_deleted_name_makes_it_available_again() -> None:
    """Our choice where the API is silent: the deleted group comes back with the new project
    and tags, and the create is counted."""

    async def t(sb: Running) -> None:
        assert code_of(await call(sb, spec.CREATE, {"Name": "R1", "Tags": [TAG]})) == (200, "")
        assert code_of(await call(sb, spec.DELETE, {"Name": "R1"})) == (200, "")
        again = {"Name": "R1", "ProjectName": "p2", "Tags": []}
        assert code_of(await call(sb, spec.CREATE, again)) == (200, "")
        assert (await _list(sb))["List"] == [
            {"Name": "R1", "ProjectName": "p2", "Status": 0, "Tags": []}
        ]
        assert (await _list(sb, StatusList=[1]))["Total"] == 0
        group = (await _groups(sb))["R1"]
        assert (group["created"], group["deleted"]) == (2, 1)

    with_sandbox(t, rate=1000)


def test_forbid_covers_every_write() -> None:
    """--forbid: creates, updates and deletes about a matching Name or project get 403."""

    async def t(sb: Running) -> None:
        assert code_of(await call(sb, spec.CREATE, {"Name": "Secret1"})) == (
            403,
            "RequestForbidden",
        )
        assert code_of(
            await call(sb, spec.CREATE, {"Name": "Open1", "ProjectName": "secretproj"})
        ) == (403, "RequestForbidden")
        assert code_of(await call(sb, spec.CREATE, {"Name": "Open2"})) == (200, "")
        assert code_of(await call(sb, spec.UPDATE, {"Name": "Secret2", "Tags": []})) == (
            403,
            "RequestForbidden",
        )
        assert code_of(await call(sb, spec.DELETE, {"Name": "Secret2"})) == (
            403,
            "RequestForbidden",
        )

    with_sandbox(t, forbid="(?i)secret")


# -- the account's history: lag, churn, preload --------------------------------------------


def test_list_lag_shows_the_account_as_it_was(tmp_path: Path) -> None:
    """--list-lag-ms: a fresh create is not listed yet, a fresh delete is still listed as
    available, a fresh update still shows the old tags, and Total agrees with the view;
    /_sandbox/state shows the truth."""
    preload = tmp_path / "pre.jsonl"
    preload.write_text(
        "".join(
            json.dumps(g) + "\n"
            for g in [{"Name": "Old1", "Tags": [TAG]}, {"Name": "Old2"}, {"Name": "Old3"}]
        )
    )

    async def t(sb: Running) -> None:
        assert code_of(await call(sb, spec.CREATE, {"Name": "New1"})) == (200, "")
        assert code_of(await call(sb, spec.DELETE, {"Name": "Old2"})) == (200, "")
        assert code_of(await call(sb, spec.UPDATE, {"Name": "Old1", "Tags": []})) == (200, "")
        view = await _list(sb)
        assert view["Total"] == 3
        assert [(g["Name"], g["Tags"]) for g in view["List"]] == [
            ("Old1", [TAG]),
            ("Old2", []),
            ("Old3", []),
        ]
        assert (await _list(sb, StatusList=[1]))["Total"] == 0
        truth = await _groups(sb)
        assert truth["New1"]["Status"] == 0 and truth["Old2"]["Status"] == 1
        assert truth["Old1"]["Tags"] == []

    with_sandbox(t, rate=1000, list_lag_ms=600_000, preload=preload)


def test_list_lag_catches_up_with_an_injected_clock() -> None:
    """The lagging view moves with the clock: once the lag has passed, List shows each write;
    the versions in between are seen in order."""
    clock = FakeClock(100.0)
    service = Service(clock=clock, list_lag_s=5.0)

    def listed(statuses: list[int] | None = None) -> list[tuple[str, list[Any]]]:
        body: dict[str, Any] = {"PageNum": 1, "PageSize": 100}
        if statuses is not None:
            body["StatusList"] = statuses
        result = service.carry_out(spec.LIST, orjson.dumps(body))
        assert result is not None
        assert result["Total"] == len(result["List"])
        return [(g["Name"], g["Tags"]) for g in result["List"]]

    service.carry_out(spec.CREATE, orjson.dumps({"Name": "G1", "Tags": [TAG]}))
    clock.t = 102.0
    service.carry_out(spec.UPDATE, orjson.dumps({"Name": "G1", "Tags": []}))
    clock.t = 104.0
    service.carry_out(spec.DELETE, orjson.dumps({"Name": "G1"}))
    assert listed() == []
    clock.t = 105.0  # the create is 5 s old
    assert listed() == [("G1", [TAG])]
    clock.t = 107.0  # the update is 5 s old
    assert listed() == [("G1", [])]
    assert listed([1]) == []
    clock.t = 109.0  # the delete is 5 s old
    assert listed() == []
    assert listed([1]) == [("G1", [])]


def test_list_churn_adds_a_group_after_each_of_the_first_pages() -> None:
    """--list-churn K: after each of the first K pages answered one new group appears, so a
    client that pages sees Total move; then the account holds still."""

    async def t(sb: Running) -> None:
        totals = [(await _list(sb))["Total"] for _ in range(4)]
        assert totals == [0, 1, 2, 2]
        groups = await _groups(sb)
        assert list(groups) == ["Churn0001", "Churn0002"]
        assert all(
            g["created"] == 0 and g["ProjectName"] == "default" and g["Tags"] == []
            for g in groups.values()
        )

    with_sandbox(t, rate=1000, list_churn=2)


def test_preload_groups_exist_with_created_zero(tmp_path: Path) -> None:
    """--preload: the manifest's groups are there from the start (a BOM, CRLF and blank lines
    are fine), counted as created 0; creating one answers Exist."""
    preload = tmp_path / "pre.jsonl"
    preload.write_bytes(
        b"\xef\xbb\xbf"
        + json.dumps(
            {"Name": "预载1", "ProjectName": "p1", "Tags": [TAG]}, ensure_ascii=False
        ).encode()
        + b"\r\n\n"
        + json.dumps({"Name": "Pre2"}).encode()
        + b"\n"
    )

    async def t(sb: Running) -> None:
        assert (await _list(sb))["List"] == [
            {"Name": "预载1", "ProjectName": "p1", "Status": 0, "Tags": [TAG]},
            {"Name": "Pre2", "ProjectName": "default", "Status": 0, "Tags": []},
        ]
        assert code_of(await call(sb, spec.CREATE, {"Name": "Pre2"})) == (
            429,
            "RequestLimitExceeded.Exist",
        )
        groups = await _groups(sb)
        assert [(g["created"], g["exist_answers"]) for g in groups.values()] == [(0, 0), (0, 1)]

    with_sandbox(t, rate=1000, preload=preload)


@pytest.mark.parametrize(
    ("lines", "where"),
    [
        (['{"Name": "Ok1"}', '{"Name": "bad-name"}'], ":2: Name:"),
        (['{"Name": "Ok1"}', "", '{"Name": "Ok1"}'], ":3: Name: 'Ok1' is already given on line 1"),
        (['{"Name": "Ok1", "Colour": "red"}'], ":1: Colour: unknown field"),
        (['{"Name": "Ok1", "Tags": [{"Key": "k"}]}'], ":1: Tags[0].Value: is required"),
        (["[1, 2]"], ":1: line: must be a JSON object"),
        (["{oops"], ":1: line: not valid JSON"),
    ],
)
def test_preload_bad_line_is_an_error_naming_file_and_line(
    tmp_path: Path, lines: list[str], where: str
) -> None:
    """A bad preload line stops the sandbox before it listens, naming FILE:LINE: FIELD."""
    preload = tmp_path / "pre.jsonl"
    preload.write_text("\n".join(lines) + "\n")

    async def t(sb: Running) -> None:
        raise AssertionError("the sandbox must not start")

    with pytest.raises(UsageError) as caught:
        with_sandbox(t, preload=preload)
    assert str(caught.value).startswith(f"{preload}{where}")


# -- the state file ------------------------------------------------------------------------


def test_state_file_round_trip_keeps_groups_counts_and_keys(tmp_path: Path) -> None:
    """--state-file: the first sandbox makes keys and saves its account on stop (owner-only,
    atomically); the next one starts with the same keys and groups, so a rerun sees them."""
    path = tmp_path / "sandbox-state.json"
    first_keys: dict[str, str] = {}

    async def first() -> None:
        async with serve(SandboxConfig(state_file=path)) as sb:
            first_keys.update(sb.keys)
            creds = Credentials(
                access_key=next(iter(sb.keys)), secret_key=next(iter(sb.keys.values()))
            )
            assert code_of(
                await call(sb, spec.CREATE, {"Name": "S1", "Tags": [TAG]}, creds=creds)
            ) == (200, "")
            assert code_of(await call(sb, spec.CREATE, {"Name": "S2"}, creds=creds)) == (200, "")
            assert code_of(await call(sb, spec.DELETE, {"Name": "S2"}, creds=creds)) == (200, "")

    async def second() -> None:
        async with serve(SandboxConfig(state_file=path)) as sb:
            assert sb.keys == first_keys
            creds = Credentials(
                access_key=next(iter(sb.keys)), secret_key=next(iter(sb.keys.values()))
            )
            assert code_of(await call(sb, spec.CREATE, {"Name": "S1"}, creds=creds)) == (
                429,
                "RequestLimitExceeded.Exist",
            )
            groups = await _groups(sb)
            assert (groups["S1"]["created"], groups["S1"]["exist_answers"]) == (1, 1)
            assert groups["S1"]["Tags"] == [TAG]
            assert (groups["S2"]["Status"], groups["S2"]["deleted"]) == (1, 1)

    asyncio.run(first())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    asyncio.run(second())
    saved = json.loads(path.read_text())
    assert saved["format"] == "worker-sandbox-state" and saved["keys"] == first_keys
    assert [g["exist_answers"] for g in saved["groups"]] == [1, 0]


@pytest.mark.parametrize(
    "content",
    [
        b"access_key_id = AK\n",
        b'{"format": "something-else", "version": 1}',
        b'{"format": "worker-sandbox-state", "version": 99, "keys": {}, "groups": []}',
        b'{"format": "worker-sandbox-state", "version": 1, "keys": {}, "groups": [{"Name": "x-y"}]}',
    ],
)
def test_state_file_refuses_what_we_did_not_write(tmp_path: Path, content: bytes) -> None:
    """A --state-file that is not ours is refused with a clear message and left untouched."""
    path = tmp_path / "state.json"
    path.write_bytes(content)

    async def t(sb: Running) -> None:
        raise AssertionError("the sandbox must not start")

    with pytest.raises(UsageError, match="is not a sandbox state file"):
        with_sandbox(t, state_file=path)
    assert path.read_bytes() == content


def test_state_file_must_be_a_regular_file_in_an_existing_folder(tmp_path: Path) -> None:
    """A FIFO or a missing folder is refused at start, before the sandbox listens."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    async def t(sb: Running) -> None:
        raise AssertionError("the sandbox must not start")

    with pytest.raises(UsageError, match="not a regular file"):
        with_sandbox(t, state_file=fifo)
    with pytest.raises(UsageError, match="does not exist"):
        with_sandbox(t, state_file=tmp_path / "no" / "state.json")


# -- faults --------------------------------------------------------------------------------


def test_faults_are_deterministic_for_a_seed() -> None:
    """The same seed gives the same faults for the same requests; another seed differs."""

    def sequence(seed: int) -> list[str]:
        out: list[str] = []

        async def t(sb: Running) -> None:
            for i in range(40):
                out.append(kind_of(await call(sb, spec.CREATE, {"Name": f"F{i}"}, timeout=2.0)))

        with_sandbox(
            t,
            rate=1000,
            fault_rate=0.5,
            seed=seed,
            hang_s=0.5,
            faults=("CommonErr", "InternalError", "ServiceUnavailableTemp", "drop"),
        )
        return out

    first, again, other = sequence(7), sequence(7), sequence(8)
    assert first == again
    assert first != other
    assert {"CommonErr", "InternalError", "ServiceUnavailableTemp", "disconnected", ""} <= set(
        first
    )


def test_fault_answers_carry_their_status_and_change_nothing() -> None:
    """CommonErr comes with HTTP 200, the 5xx codes with theirs; a faulted create creates
    nothing."""
    seen: dict[str, int] = {}

    async def t(sb: Running) -> None:
        for i in range(60):
            status, code = code_of(await call(sb, spec.CREATE, {"Name": f"C{i}"}))
            seen[code] = status
        state = await _state(sb)
        assert len(state["groups"]) == 60 - sum(v for k, v in state["codes"].items() if k != "OK")

    with_sandbox(
        t,
        rate=1000,
        fault_rate=0.6,
        faults=(
            "CommonErr",
            "InternalError",
            "InternalServiceError",
            "ServiceUnavailableTemp",
            "InternalServiceTimeout",
        ),
    )
    assert seen == {
        "": 200,
        "CommonErr": 200,
        "InternalError": 500,
        "InternalServiceError": 502,
        "ServiceUnavailableTemp": 503,
        "InternalServiceTimeout": 504,
    }


def test_ambiguous_creates_are_carried_out() -> None:
    """An ambiguous fault creates the group, then answers 504 or drops the connection."""

    async def t(sb: Running) -> None:
        kinds = []
        for i in range(12):
            kinds.append(kind_of(await call(sb, spec.CREATE, {"Name": f"Amb{i}"})))
            again = await call(sb, spec.CREATE, {"Name": f"Amb{i}"})
            assert code_of(again) == (429, "RequestLimitExceeded.Exist")
        assert set(kinds) == {"InternalServiceTimeout", "disconnected"}
        state = await _state(sb)
        assert all(g["created"] == 1 and g["exist_answers"] == 1 for g in state["groups"])

    with_sandbox(t, rate=1000, ambiguous_rate=1.0, seed=3)


def test_hang_until_client_times_out() -> None:
    """A `hang` fault never answers: the client sees its own timeout."""

    async def t(sb: Running) -> None:
        assert await call(sb, spec.CREATE, {"Name": "H1"}, timeout=0.3) == "timeout"

    with_sandbox(t, fault_rate=1.0, faults=("hang",), hang_s=5)


def test_latency_is_applied() -> None:
    """Answers take at least the configured minimum latency."""

    async def t(sb: Running) -> None:
        start = time.monotonic()
        assert code_of(await call(sb, spec.CREATE, {"Name": "L1"})) == (200, "")
        assert time.monotonic() - start >= 0.2

    with_sandbox(t, latency_ms=(200, 250))


# -- what an observer sees -----------------------------------------------------------------


def test_arrival_log_and_state_cover_all_four_actions(tmp_path: Path) -> None:
    """Every arrival is logged with time, AK, action, Name (null for List), PageNum (List
    only), status and code; /_sandbox/state counts codes and arrivals."""
    log = tmp_path / "arrivals.jsonl"

    async def t(sb: Running) -> None:
        await call(sb, spec.CREATE, {"Name": "Log1"})
        await call(sb, spec.CREATE, {"Name": "Log1"})
        await call(
            sb,
            spec.CREATE,
            {"Name": "Log2"},
            creds=Credentials(access_key="AKSB", secret_key="bad"),
        )
        await call(sb, spec.LIST, {"PageNum": 3, "PageSize": 10, "Name": "ignored"})
        await call(sb, spec.UPDATE, {"Name": "Log1", "Tags": []})
        await call(sb, spec.DELETE, {"Name": "Log1"})
        await call(sb, spec.DELETE, {"Name": "Log1"})
        state = await _state(sb)
        assert state["codes"] == {
            "OK": 4,
            "RequestLimitExceeded.Exist": 1,
            "SignatureDoesNotMatch": 1,
            "ResourceNotFound": 1,
        }
        assert state["arrivals"] == 7

    with_sandbox(t, log=log, rate=1000)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["action"], r["name"], r["page"], r["status"], r["code"]) for r in rows] == [
        (spec.CREATE, "Log1", None, 200, ""),
        (spec.CREATE, "Log1", None, 429, "RequestLimitExceeded.Exist"),
        (spec.CREATE, "Log2", None, 401, "SignatureDoesNotMatch"),
        (spec.LIST, None, 3, 200, ""),
        (spec.UPDATE, "Log1", None, 200, ""),
        (spec.DELETE, "Log1", None, 200, ""),
        (spec.DELETE, "Log1", None, 404, "ResourceNotFound"),
    ]
    assert all(r["ak"] in ("AKSB", "") and r["t"] > 0 for r in rows)


def test_config_rejects_nonsense() -> None:
    """Impossible settings are refused when the sandbox is configured."""
    for bad in (
        {"fault_rate": 0.8, "ambiguous_rate": 0.5},
        {"list_lag_ms": -1.0},
        {"list_lag_ms": float("nan")},
        {"list_churn": -1},
        {"rate": 0},
    ):
        with pytest.raises(UsageError):
            SandboxConfig(**bad)
    with pytest.raises(UsageError):
        replace(SandboxConfig(), faults=("meteor",))


def test_service_answers_are_api_errors() -> None:
    """The service alone (no socket): errors are ApiError values with status and code."""
    service = Service(clock=FakeClock())
    with pytest.raises(ApiError) as caught:
        service.carry_out(spec.DELETE, b'{"Name": "Nope"}')
    assert (caught.value.status, caught.value.code) == (404, "ResourceNotFound")


def test_importing_the_package_does_not_load_the_server() -> None:
    """`import worker.sandbox` (as `worker --help`, validate and report do) leaves
    aiohttp.web unloaded."""
    code = "import sys, worker.sandbox, worker.sandbox.cli; print('aiohttp.web' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- the process ---------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sandbox_process_prints_credentials_and_stops_cleanly(sig: int) -> None:
    """`python -m worker sandbox` without --keys prints its URL and a throwaway pair, serves
    them, and exits 0 on SIGINT or SIGTERM."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "sandbox"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().split()[-1]
    creds = dict(part.split("=", 1) for part in proc.stdout.readline().split()[1:])
    assert url.startswith("http://127.0.0.1:")
    ak, sk = creds["VOLC_ACCESSKEY"], creds["VOLC_SECRETKEY"]
    running = Running(url=url, keys={ak: sk}, app=SandboxApp(SandboxConfig()))
    resp = arun(
        call(
            running,
            spec.CREATE,
            {"Name": "Printed1"},
            creds=Credentials(access_key=ak, secret_key=sk),
        )
    )
    assert code_of(resp) == (200, "")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "sandbox stopped" in out and "Traceback" not in err


def test_sandbox_process_preloads_and_saves_its_state_on_sigterm(tmp_path: Path) -> None:
    """`worker sandbox --preload M --state-file S`: the preloaded groups are listed, and
    SIGTERM saves them with the printed keys; a bad preload exits 2 naming the line."""
    preload = tmp_path / "pre.jsonl"
    preload.write_text('{"Name": "Proc1"}\n')
    state = tmp_path / "state.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker",
            "sandbox",
            "--preload",
            str(preload),
            "--state-file",
            str(state),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().split()[-1]
    creds = dict(part.split("=", 1) for part in proc.stdout.readline().split()[1:])
    ak, sk = creds["VOLC_ACCESSKEY"], creds["VOLC_SECRETKEY"]
    running = Running(url=url, keys={ak: sk}, app=SandboxApp(SandboxConfig()))
    listed = arun(
        call(
            running,
            spec.LIST,
            {"PageNum": 1, "PageSize": 10},
            creds=Credentials(access_key=ak, secret_key=sk),
        )
    )
    assert [g["Name"] for g in result_of(listed)["List"]] == ["Proc1"]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    saved = json.loads(state.read_text())
    assert saved["keys"] == {ak: sk} and [g["Name"] for g in saved["groups"]] == ["Proc1"]

    preload.write_text('{"Name": "Proc1"}\n{"Name": 7}\n')
    bad = subprocess.run(
        [sys.executable, "-m", "worker", "sandbox", "--preload", str(preload)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2
    assert f"{preload}:2: Name:" in bad.stderr and "Traceback" not in bad.stderr


# -- a moving account ------------------------------------------------------------------------


def _names(service: Service, page: int = 1, size: int = 100) -> list[str]:
    result = service.carry_out(
        spec.LIST, orjson.dumps({"PageNum": page, "PageSize": size, "StatusList": [0]})
    )
    assert result is not None
    return [g["Name"] for g in result["List"]]


def _created(service: Service, n: int) -> None:
    for i in range(n):
        service.carry_out(spec.CREATE, orjson.dumps({"Name": f"G{i}"}))


def test_list_order_newest_first() -> None:
    """--list-order newest: the last group created is on page 1, first."""
    service = Service(clock=FakeClock(), list_order="newest")
    _created(service, 5)
    assert _names(service) == ["G4", "G3", "G2", "G1", "G0"]
    assert _names(service, page=2, size=2) == ["G2", "G1"]


def test_list_order_shuffled_differs_between_calls_and_is_seeded() -> None:
    """--list-order shuffled: every call a new order of the same groups; the seed fixes it."""
    a, b = (Service(clock=FakeClock(), list_order="shuffled", seed=7) for _ in range(2))
    for service in (a, b):
        _created(service, 30)
    first, second = _names(a), _names(a)
    assert sorted(first) == sorted(second) == sorted(f"G{i}" for i in range(30))
    assert first != second
    assert _names(b) == first  # same seed, same sequence


def test_churn_every_creates_and_deletes_on_the_clock() -> None:
    """--churn-every 2: another party's group appears every 2 s and goes 1 s later; the
    account's own groups are never touched."""
    clock = FakeClock(100.0)
    service = Service(clock=clock, churn_every_s=2.0, list_order="newest")
    _created(service, 3)
    clock.t = 102.0
    assert _names(service)[0].startswith("Churn")  # created at 102, newest first
    clock.t = 103.5
    assert _names(service) == ["G2", "G1", "G0"]  # deleted at 103
    clock.t = 110.2  # five more ticks at once: the last one's group is still there
    names = _names(service)
    assert names[0].startswith("Churn") and names[1:] == ["G2", "G1", "G0"]
    created = [g for g in service.state() if g["Name"].startswith("Churn")]
    assert len(created) == 5 and sum(g["Status"] == 0 for g in created) == 1


def test_preload_of_20000_groups_lists_fast_enough_with_churn() -> None:
    """20 000 groups, newest first, churn: twenty pages of 1000 each answer promptly (the
    view is cached between changes; no timed assert, only that it completes and counts)."""
    clock = FakeClock(100.0)
    service = Service(clock=clock, churn_every_s=2.0, list_order="newest")
    service.load(Stored(name=f"P{i}", project="p", tags=[], status=0) for i in range(20_000))
    seen: set[str] = set()
    for page in range(1, 21):
        clock.t += 0.1
        seen.update(_names(service, page=page, size=1000))
    assert len(seen) >= 19_990


def test_sandbox_refuses_an_unknown_list_order_and_negative_churn() -> None:
    """Bad --list-order or --churn-every values are usage errors."""
    with pytest.raises(UsageError, match="--list-order"):
        SandboxConfig(list_order="random")
    with pytest.raises(UsageError, match="--churn-every"):
        SandboxConfig(churn_every_s=-1)
