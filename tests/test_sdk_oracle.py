"""The sandbox agrees with the official client (PyPI `volcengine`), not only with ours."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from volcengine.live.v20230101.live_service import LiveService

from tests.conftest import AK, SK, SandboxProc


def _client(sb: SandboxProc, ak: str = AK, sk: str = SK) -> LiveService:
    service = LiveService(host=urlsplit(sb.url).netloc, ak=ak, sk=sk)
    service.set_scheme("http")
    return service


def _call(method: Callable[[dict[str, Any]], Any], body: dict[str, Any]) -> tuple[int, str]:
    """(HTTP-ish outcome, error code): the SDK raises with the raw body on non-200."""
    try:
        res = method(body)
    except Exception as exc:  # the SDK's only signal for a non-200 answer
        raw = exc.args[0]
        meta = json.loads(raw.decode() if isinstance(raw, bytes) else raw)["ResponseMetadata"]
        return 0, meta["Error"]["Code"]
    return 200, res["ResponseMetadata"].get("Error", {}).get("Code", "")


def _create(service: LiveService, body: dict[str, Any]) -> tuple[int, str]:
    return _call(service.create_pull_to_push_group, body)


def _list(service: LiveService, **body: Any) -> dict[str, Any]:
    res = service.list_pull_to_push_group(body)
    assert "Error" not in res["ResponseMetadata"]
    assert res["ResponseMetadata"]["Action"] == "ListPullToPushGroup"
    result: dict[str, Any] = res["Result"]
    return result


def test_official_sdk_create_exists_and_bad_secret(sandbox: SandboxProc) -> None:
    """SDK create: 200; again: RequestLimitExceeded.Exist; a wrong secret: SignatureDoesNotMatch."""
    service = _client(sandbox)
    assert _create(
        service,
        {
            "Name": "官方客户端01",
            "ProjectName": "default",
            "Tags": [{"Key": "键", "Value": "值", "Category": "Custom"}],
        },
    ) == (200, "")
    assert _create(service, {"Name": "官方客户端01", "ProjectName": "default"}) == (
        0,
        "RequestLimitExceeded.Exist",
    )
    assert _create(_client(sandbox, sk="not-the-secret"), {"Name": "官方客户端02"}) == (
        0,
        "SignatureDoesNotMatch",
    )
    groups = sandbox.state()["groups"]
    assert [(g["Name"], g["created"]) for g in groups] == [("官方客户端01", 1)]
    assert groups[0]["Tags"] == [{"Key": "键", "Value": "值", "Category": "Custom"}]


@pytest.mark.serial  # the 25 must arrive inside one second to be a burst
def test_official_sdk_burst_is_throttled(sandbox_factory: Any) -> None:
    """25 SDK creates fired at once at --rate 10: at least 10 answered FlowLimitExceeded."""
    sb: SandboxProc = sandbox_factory("--rate", "10")
    service = _client(sb)
    with ThreadPoolExecutor(25) as pool:
        results = list(pool.map(lambda i: _create(service, {"Name": f"Burst{i}"}), range(25)))
    throttled = sum(1 for _, code in results if code == "FlowLimitExceeded")
    created = sum(1 for status, _ in results if status == 200)
    assert throttled >= 10
    assert created + throttled == 25
    assert len(sb.state()["groups"]) == created <= 10


def test_official_sdk_list_update_delete(sandbox_factory: Any, tmp_path: Path) -> None:
    """SDK List pages a preloaded account with a Total; Update replaces the tags; Delete
    hides the group from List but for StatusList [1]; a second Delete is ResourceNotFound."""
    preload = tmp_path / "pre.jsonl"
    preload.write_text(
        "".join(
            json.dumps({"Name": f"官方{i}", "ProjectName": "p1"}, ensure_ascii=False) + "\n"
            for i in range(3)
        ),
        encoding="utf-8",
    )
    sb: SandboxProc = sandbox_factory("--rate", "100", "--preload", str(preload))
    service = _client(sb)
    first, second = _list(service, PageNum=1, PageSize=2), _list(service, PageNum=2, PageSize=2)
    assert first["Total"] == second["Total"] == 3
    assert [g["Name"] for g in first["List"] + second["List"]] == ["官方0", "官方1", "官方2"]
    assert first["List"][0] == {"Name": "官方0", "ProjectName": "p1", "Status": 0, "Tags": []}
    tags = [{"Key": "键", "Value": "值", "Category": "System"}]
    assert _call(service.update_pull_to_push_group, {"Name": "官方1", "Tags": tags}) == (200, "")
    assert _list(service, PageNum=1, PageSize=10)["List"][1]["Tags"] == tags
    assert _call(service.delete_pull_to_push_group, {"Name": "官方2"}) == (200, "")
    assert _call(service.delete_pull_to_push_group, {"Name": "官方2"}) == (0, "ResourceNotFound")
    assert _call(service.update_pull_to_push_group, {"Name": "官方2", "Tags": []}) == (
        0,
        "ResourceNotFound",
    )
    assert _list(service, PageNum=1, PageSize=10)["Total"] == 2
    deleted = _list(service, PageNum=1, PageSize=10, StatusList=[1])
    assert [(g["Name"], g["Status"]) for g in deleted["List"]] == [("官方2", 1)]
    assert _call(service.list_pull_to_push_group, {"PageNum": 0, "PageSize": 10}) == (
        0,
        "InvalidParam",
    )
    state = {g["Name"]: g for g in sb.state()["groups"]}
    assert (state["官方1"]["updated"], state["官方2"]["deleted"]) == (1, 1)
    assert all(g["created"] == 0 for g in state.values())
    listed = [a for a in sb.arrivals() if a["action"] == "ListPullToPushGroup"]
    assert [(a["name"], a["page"]) for a in listed][:2] == [(None, 1), (None, 2)]
