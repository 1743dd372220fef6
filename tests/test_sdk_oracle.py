"""The sandbox agrees with the official client (PyPI `volcengine`), not only with ours."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from volcengine.live.v20230101.live_service import LiveService

from tests.conftest import AK, SK, SandboxProc


def _client(sb: SandboxProc, ak: str = AK, sk: str = SK) -> LiveService:
    service = LiveService(host=urlsplit(sb.url).netloc, ak=ak, sk=sk)
    service.set_scheme("http")
    return service


def _create(service: LiveService, body: dict[str, Any]) -> tuple[int, str]:
    """(HTTP-ish outcome, error code): the SDK raises with the raw body on non-200."""
    try:
        res = service.create_pull_to_push_group(body)
    except Exception as exc:  # the SDK's only signal for a non-200 answer
        raw = exc.args[0]
        meta = json.loads(raw.decode() if isinstance(raw, bytes) else raw)["ResponseMetadata"]
        return 0, meta["Error"]["Code"]
    return 200, res["ResponseMetadata"].get("Error", {}).get("Code", "")


def test_official_sdk_create_exists_and_bad_secret(sandbox: SandboxProc) -> None:
    """SDK create: 200; again: RequestLimitExceeded.Exist; a wrong secret: SignatureDoesNotMatch."""
    service = _client(sandbox)
    assert _create(service, {"Name": "官方客户端01", "ProjectName": "default",
                             "Tags": [{"Key": "键", "Value": "值", "Category": "Custom"}]}) == (200, "")
    assert _create(service, {"Name": "官方客户端01", "ProjectName": "default"}) == \
        (0, "RequestLimitExceeded.Exist")
    assert _create(_client(sandbox, sk="not-the-secret"), {"Name": "官方客户端02"}) == \
        (0, "SignatureDoesNotMatch")
    groups = sandbox.state()["groups"]
    assert [(g["Name"], g["created"]) for g in groups] == [("官方客户端01", 1)]
    assert groups[0]["Tags"] == [{"Key": "键", "Value": "值", "Category": "Custom"}]


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
