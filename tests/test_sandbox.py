"""The sandbox at the HTTP level: every behaviour, over real loopback sockets."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import orjson
import pytest

from worker import api
from worker.sandbox import Running, SandboxApp, SandboxConfig, serve
from worker.signing import Credentials, sign
from worker.transport import Failure, Response, Transport

T = TypeVar("T")
KEYS = {"AKSB": "SKsandbox"}
GOOD = Credentials(access_key="AKSB", secret_key="SKsandbox")


def arun(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro
    return asyncio.run(main())


async def call(sb: Running, action: str, body: Any, *, creds: Credentials = GOOD,
               now: datetime | None = None, version: str = api.VERSION,
               region: str = "cn-north-1", edit: Callable[[dict[str, str]], None] | None = None,
               raw: bytes | None = None, timeout: float = 5.0) -> Response | Failure:
    data = raw if raw is not None else orjson.dumps(body)
    query = {"Action": action, "Version": version}
    headers = sign(method="POST", host=urlsplit(sb.url).netloc, path="/", query=query,
                   content_type="application/json", body=data, credentials=creds,
                   region=region, now=now or datetime.now(UTC))
    if edit is not None:
        edit(headers)
    async with Transport(sb.url, timeout_s=timeout, max_connections=4) as t:
        return await t.send(query, headers, data)


def code_of(resp: Response | Failure) -> tuple[int, str]:
    assert isinstance(resp, Response), resp
    meta = orjson.loads(resp.body)["ResponseMetadata"]
    return resp.status, meta.get("Error", {}).get("Code", "")


def with_sandbox(test: Callable[[Running], Awaitable[None]], **config: Any) -> None:
    config.setdefault("keys", KEYS)
    async def main() -> None:
        async with serve(SandboxConfig(**config)) as sb:
            await test(sb)
    asyncio.run(main())


def test_create_list_update_delete() -> None:
    """The four actions with their documented envelopes; a second create answers Exist."""
    async def t(sb: Running) -> None:
        body = {"Name": "华北群组1", "ProjectName": "default",
                "Tags": [{"Key": "k", "Value": "v", "Category": "Custom"}]}
        resp = await call(sb, api.CREATE, body)
        assert code_of(resp) == (200, "")
        assert isinstance(resp, Response)
        meta = orjson.loads(resp.body)["ResponseMetadata"]
        assert meta["Action"] == api.CREATE and meta["RequestId"] and meta["Region"] == "cn-north-1"
        assert code_of(await call(sb, api.CREATE, body)) == (429, "RequestLimitExceeded.Exist")
        listed = await call(sb, api.LIST, {"PageNum": 1, "PageSize": 10})
        assert isinstance(listed, Response)
        result = orjson.loads(listed.body)["Result"]
        assert result["Total"] == 1 and result["List"][0]["Name"] == "华北群组1"
        assert result["List"][0]["Status"] == 0
        new_tags = [{"Key": "a", "Value": "b", "Category": "System"}]
        assert code_of(await call(sb, api.UPDATE, {"Name": "华北群组1", "Tags": new_tags})) == (200, "")
        assert code_of(await call(sb, api.DELETE, {"Name": "华北群组1"})) == (200, "")
        deleted = await call(sb, api.LIST, {"PageNum": 1, "PageSize": 10, "StatusList": [1]})
        assert isinstance(deleted, Response)
        group = orjson.loads(deleted.body)["Result"]["List"][0]
        assert group["Status"] == 1 and group["Tags"] == new_tags
        assert code_of(await call(sb, api.DELETE, {"Name": "nope"})) == (404, "ResourceNotFound")
        assert code_of(await call(sb, api.LIST, {"PageNum": 0, "PageSize": 10})) == (400, "InvalidParam")
    with_sandbox(t, rate=100)


def test_unknown_action_or_version() -> None:
    """Unknown actions and versions answer 404 InvalidActionOrVersion."""
    async def t(sb: Running) -> None:
        assert code_of(await call(sb, "CreateSomething", {})) == (404, "InvalidActionOrVersion")
        assert code_of(await call(sb, api.CREATE, {"Name": "a"}, version="2020-01-01")) == \
            (404, "InvalidActionOrVersion")
    with_sandbox(t)


def test_authentication_errors() -> None:
    """Each way a signature can be wrong gets its own documented code and status."""
    async def t(sb: Running) -> None:
        body = {"Name": "A1"}
        def drop_auth(h: dict[str, str]) -> None:
            del h["Authorization"]
        assert code_of(await call(sb, api.CREATE, body, edit=drop_auth)) == \
            (401, "MissingAuthenticationToken")
        assert code_of(await call(sb, api.CREATE, body, creds=Credentials(
            access_key="AKNOPE", secret_key="x"))) == (401, "InvalidAccessKey")
        assert code_of(await call(sb, api.CREATE, body, creds=Credentials(
            access_key="AKSB", secret_key="wrong"))) == (401, "SignatureDoesNotMatch")
        assert code_of(await call(sb, api.CREATE, body, region="cn-beijing")) == \
            (401, "SignatureDoesNotMatch")
        def wrong_hash(h: dict[str, str]) -> None:
            h["X-Content-Sha256"] = "0" * 64
        assert code_of(await call(sb, api.CREATE, body, edit=wrong_hash)) == \
            (401, "SignatureDoesNotMatch")
        def unsigned_token(h: dict[str, str]) -> None:
            h["X-Security-Token"] = "smuggled"
        assert code_of(await call(sb, api.CREATE, body, edit=unsigned_token)) == \
            (401, "SignatureDoesNotMatch")
        stale = datetime.now(UTC) - timedelta(minutes=16)
        assert code_of(await call(sb, api.CREATE, body, now=stale)) == (400, "InvalidTimestamp")
        near = datetime.now(UTC) - timedelta(minutes=14)
        assert code_of(await call(sb, api.CREATE, body, now=near)) == (200, "")
        sts = Credentials(access_key="AKSB", secret_key="SKsandbox", session_token="STS-token")
        assert code_of(await call(sb, api.CREATE, {"Name": "A2"}, creds=sts)) == (200, "")
        assert [g["Name"] for g in (await _state(sb))["groups"]] == ["A1", "A2"]
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
            ({"Name": "ok1", "Tags": [{"Key": "k", "Value": "v", "Category": "custom"}]}, "InvalidParam"),
            ({"Name": 12}, "InvalidParam.BindError"),
            ({"Name": "ok2", "ProjectName": 3}, "InvalidParam.BindError"),
            ({"Name": "ok3", "Tags": {"Key": "k"}}, "InvalidParam.BindError"),
            ({"Name": "ok4", "Tags": [{"Key": 1, "Value": "v", "Category": "Custom"}]}, "InvalidParam.BindError"),
        ]
        for body, code in cases:
            assert code_of(await call(sb, api.CREATE, body)) == (400, code), body
        assert code_of(await call(sb, api.CREATE, None, raw=b"{not json")) == \
            (400, "InvalidParam.BindError")
        assert (await _state(sb))["groups"] == []
    with_sandbox(t, rate=100)


def test_window_boundary_unit() -> None:
    """Strict sliding window: the (rate+1)-th arrival inside 1 s is refused, and admitted
    again exactly once the oldest arrival is a full second old."""
    app = SandboxApp(SandboxConfig(rate=3, keys=KEYS))
    for t in (10.0, 10.2, 10.4):
        app._admit("AKSB", t)
    with pytest.raises(Exception, match="more than 3"):
        app._admit("AKSB", 10.999)
    app._admit("AKSB", 11.0)  # 10.0 has left the window (10.0 <= 11.0 - 1)
    with pytest.raises(Exception, match="more than 3"):
        app._admit("AKSB", 11.1)
    app._admit("AKOTHER", 11.1)  # per access key


def test_burst_is_throttled_and_changes_nothing() -> None:
    """Over the window: 429 FlowLimitExceeded and the group is not created."""
    async def t(sb: Running) -> None:
        results = await asyncio.gather(*(call(sb, api.CREATE, {"Name": f"B{i}"}) for i in range(6)))
        codes = sorted(code_of(r)[1] for r in results)
        assert codes == ["", "", "", "FlowLimitExceeded", "FlowLimitExceeded", "FlowLimitExceeded"]
        assert len((await _state(sb))["groups"]) == 3
        await asyncio.sleep(1.05)
        assert code_of(await call(sb, api.CREATE, {"Name": "later"})) == (200, "")
    with_sandbox(t, rate=3)


def test_faults_are_deterministic_for_a_seed(tmp_path: Path) -> None:
    """The same seed gives the same faults for the same requests; another seed differs."""
    def sequence(seed: int) -> list[str]:
        out: list[str] = []
        async def t(sb: Running) -> None:
            for i in range(40):
                resp = await call(sb, api.CREATE, {"Name": f"F{i}"}, timeout=1.0)
                out.append(code_of(resp)[1] if isinstance(resp, Response) else resp.kind)
        with_sandbox(t, rate=1000, fault_rate=0.5, seed=seed, hang_s=0.5,
                     faults=("CommonErr", "InternalError", "ServiceUnavailableTemp", "drop"))
        return out
    first, again, other = sequence(7), sequence(7), sequence(8)
    assert first == again
    assert first != other
    assert {"CommonErr", "InternalError", "ServiceUnavailableTemp", "disconnected", ""} <= set(first)
    commonerr = [c for c in first if c == "CommonErr"]
    assert commonerr  # CommonErr comes with HTTP 200, checked below


def test_commonerr_comes_with_200_and_5xx_codes() -> None:
    """Fault answers carry the documented status for each code and change nothing."""
    seen: dict[str, int] = {}
    async def t(sb: Running) -> None:
        for i in range(60):
            resp = await call(sb, api.CREATE, {"Name": f"C{i}"})
            status, code = code_of(resp)
            seen[code] = status
        state = await _state(sb)
        assert len(state["groups"]) == 60 - sum(v for k, v in state["codes"].items() if k != "OK")
    with_sandbox(t, rate=1000, fault_rate=0.6, faults=(
        "CommonErr", "InternalError", "InternalServiceError", "ServiceUnavailableTemp",
        "InternalServiceTimeout"))
    assert seen == {"": 200, "CommonErr": 200, "InternalError": 500, "InternalServiceError": 502,
                    "ServiceUnavailableTemp": 503, "InternalServiceTimeout": 504}


def test_ambiguous_creates_are_carried_out() -> None:
    """An ambiguous fault creates the group, then answers 504 or drops the connection."""
    async def t(sb: Running) -> None:
        kinds = []
        for i in range(12):
            resp = await call(sb, api.CREATE, {"Name": f"Amb{i}"})
            kinds.append(code_of(resp)[1] if isinstance(resp, Response) else resp.kind)
            again = await call(sb, api.CREATE, {"Name": f"Amb{i}"})
            assert code_of(again) == (429, "RequestLimitExceeded.Exist")
        assert set(kinds) == {"InternalServiceTimeout", "disconnected"}
        state = await _state(sb)
        assert all(g["created"] == 1 and g["exist_answers"] == 1 for g in state["groups"])
    with_sandbox(t, rate=1000, ambiguous_rate=1.0, seed=3)


def test_hang_until_client_times_out() -> None:
    """A `hang` fault never answers: the client sees its own timeout."""
    async def t(sb: Running) -> None:
        resp = await call(sb, api.CREATE, {"Name": "H1"}, timeout=0.3)
        assert isinstance(resp, Failure) and resp.kind == "timeout"
    with_sandbox(t, fault_rate=1.0, faults=("hang",), hang_s=5)


def test_forbidden_rule() -> None:
    """Names or projects matching --forbid are refused with 403 RequestForbidden."""
    async def t(sb: Running) -> None:
        assert code_of(await call(sb, api.CREATE, {"Name": "Secret1"})) == (403, "RequestForbidden")
        assert code_of(await call(sb, api.CREATE, {"Name": "Open1", "ProjectName": "secretproj"})) \
            == (403, "RequestForbidden")
        assert code_of(await call(sb, api.CREATE, {"Name": "Open2"})) == (200, "")
    with_sandbox(t, forbid="(?i)secret")


def test_latency_is_applied() -> None:
    """Answers take at least the configured minimum latency."""
    async def t(sb: Running) -> None:
        start = time.monotonic()
        assert code_of(await call(sb, api.CREATE, {"Name": "L1"})) == (200, "")
        assert time.monotonic() - start >= 0.2
    with_sandbox(t, latency_ms=(200, 250))


def test_arrival_log_and_state(tmp_path: Path) -> None:
    """Every arrival is logged with time, AK, action, Name, status and code."""
    log = tmp_path / "arrivals.jsonl"
    async def t(sb: Running) -> None:
        await call(sb, api.CREATE, {"Name": "Log1"})
        await call(sb, api.CREATE, {"Name": "Log1"})
        await call(sb, api.CREATE, {"Name": "Log2"}, creds=Credentials(access_key="AKSB", secret_key="bad"))
        state = await _state(sb)
        assert state["codes"] == {"OK": 1, "RequestLimitExceeded.Exist": 1, "SignatureDoesNotMatch": 1}
        assert state["arrivals"] == 3
    with_sandbox(t, log=log)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["name"], r["status"], r["code"]) for r in rows] == [
        ("Log1", 200, ""), ("Log1", 429, "RequestLimitExceeded.Exist"), ("Log2", 401, "SignatureDoesNotMatch")]
    assert all(r["ak"] in ("AKSB", "") and r["action"] == api.CREATE and r["t"] > 0 for r in rows)


def test_config_rejects_nonsense() -> None:
    """Impossible settings are refused when the sandbox is configured."""
    from worker.errors import UsageError
    with pytest.raises(UsageError):
        SandboxConfig(fault_rate=0.8, ambiguous_rate=0.5)
    with pytest.raises(UsageError):
        replace(SandboxConfig(), faults=("meteor",))


async def _state(sb: Running) -> dict[str, Any]:
    from urllib.request import urlopen
    def fetch() -> dict[str, Any]:
        with urlopen(sb.url + "/_sandbox/state", timeout=5) as resp:
            data: dict[str, Any] = json.load(resp)
        return data
    return await asyncio.to_thread(fetch)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sandbox_process_prints_credentials_and_stops_cleanly(sig: int) -> None:
    """`python -m worker sandbox` without --keys prints its URL and a throwaway pair, serves
    them, and exits 0 on SIGINT or SIGTERM."""
    proc = subprocess.Popen([sys.executable, "-m", "worker", "sandbox"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    url = proc.stdout.readline().split()[-1]
    creds = dict(part.split("=", 1) for part in proc.stdout.readline().split()[1:])
    assert url.startswith("http://127.0.0.1:")
    ak, sk = creds["VOLC_ACCESSKEY"], creds["VOLC_SECRETKEY"]
    running = Running(url=url, keys={ak: sk}, app=SandboxApp(SandboxConfig()))
    resp = arun(call(running, api.CREATE, {"Name": "Printed1"},
                     creds=Credentials(access_key=ak, secret_key=sk)))
    assert code_of(resp) == (200, "")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "sandbox stopped" in out and "Traceback" not in err
