"""The signer is byte-exact with the official SDK (volcengine.auth.SignerV4)."""

from __future__ import annotations

import random
from collections import OrderedDict
from datetime import UTC, datetime, timedelta

import pytest
from volcengine.auth.SignerV4 import SignerV4
from volcengine.auth.SignParam import SignParam
from volcengine.Credentials import Credentials as SdkCredentials

from worker.signing import Credentials, canonical_host, canonical_query, sign

WHEN = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
QUERY = {"Action": "CreatePullToPushGroup", "Version": "2023-01-01"}

KNOWN = [
    (b'{"Name": "RelayGroup001", "ProjectName": "default"}', "",
     "f00bf3c3fc1e325ae51473eeb9d36ef610030139110d5aeb8416114ccc802d51"),
    (b'{"Name":"RelayGroup001","ProjectName":"default"}', "",
     "b291a0a0ed15f02a2e19309fa32e6ae600a03f9672c8e58fb469d294de4db60c"),
    (b'{"Name":"RelayGroup001","ProjectName":"default"}', "STSTOKEN",
     "9207eeb2cb32ae6594a480a62eb2475f7e7830dcc22807a0b716607443a522c3"),
    ('{"Name":"中文群组","ProjectName":"default"}'.encode(), "",
     "39f0dffae4d5ead195d65e234b37190106c95b7930ad8dcc160a62a9d24c2789"),
]


def _ours(body: bytes, ak: str, sk: str, token: str, host: str, when: datetime) -> dict[str, str]:
    return sign(method="POST", host=host, path="/", query=QUERY, content_type="application/json",
                body=body, credentials=Credentials(access_key=ak, secret_key=sk,
                                                   session_token=token),
                region="cn-north-1", now=when)


def _sdk(body: bytes, ak: str, sk: str, token: str, host: str, when: datetime) -> str:
    param = SignParam()
    param.set_method("POST")
    param.set_host(host)
    param.set_path("/")
    param.set_query(dict(QUERY))
    param.set_body(body.decode("utf-8"))
    param.set_date(when)
    param.set_header_list(OrderedDict([("Content-Type", "application/json"), ("Host", host)]))
    creds = SdkCredentials(ak, sk, "live", "cn-north-1", token)
    result = SignerV4.sign_only(param, creds)
    return str(result.authorization)


@pytest.mark.parametrize(("body", "token", "signature"), KNOWN)
def test_known_answers(body: bytes, token: str, signature: str) -> None:
    """The four published known-answer vectors match exactly."""
    headers = _ours(body, "AKTEST", "SKTEST", token, "live.volcengineapi.com", WHEN)
    assert headers["Authorization"] == (
        "HMAC-SHA256 Credential=AKTEST/20240102/cn-north-1/live/request, SignedHeaders="
        + ("content-type;host;x-content-sha256;x-date;x-security-token" if token
           else "content-type;host;x-content-sha256;x-date")
        + f", Signature={signature}")
    assert headers["X-Date"] == "20240102T030405Z"
    assert ("X-Security-Token" in headers) == bool(token)


def test_known_answers_agree_with_sdk() -> None:
    """The oracle itself reproduces the vectors (so the random comparison below means something)."""
    for body, token, signature in KNOWN:
        auth = _sdk(body, "AKTEST", "SKTEST", token, "live.volcengineapi.com", WHEN)
        assert auth.endswith(f"Signature={signature}")


def _random_body(rng: random.Random) -> bytes:
    chars = "群组直播转推华北东南赛事新闻ABCXYZabcxyz0123456789"
    name = "".join(rng.choice(chars) for _ in range(rng.randint(1, 20)))
    parts = [f'"Name":"{name}"', '"ProjectName":"' + rng.choice(["default", "项目一", "p2"]) + '"']
    if rng.random() < 0.6:
        tags = ",".join(
            f'{{"Key":"键{i}{rng.randint(0, 99)}","Value":"值 {rng.random():.3f}/+=&",'
            f'"Category":"{rng.choice(["Custom", "System"])}"}}'
            for i in range(rng.randint(1, 4)))
        parts.append(f'"Tags":[{tags}]')
    return ("{" + ",".join(parts) + "}").encode()


def test_random_requests_match_sdk() -> None:
    """200 random requests (Chinese names, tags, tokens, hosts with ports) sign identically."""
    rng = random.Random(20261129)
    for i in range(200):
        body = _random_body(rng)
        token = rng.choice(["", "", "STS" + "x" * rng.randint(5, 60)])
        host = rng.choice(["live.volcengineapi.com", "127.0.0.1:8080", "localhost:443",
                           "example.test:80"])
        ak = f"AK{rng.randint(0, 10**9)}"
        sk = "".join(rng.choice("abcdefABCDEF0123456789+/") for _ in range(40))
        when = WHEN + timedelta(seconds=rng.randint(0, 10**8))
        ours = _ours(body, ak, sk, token, host, when)["Authorization"]
        assert ours == _sdk(body, ak, sk, token, host, when), f"request {i}"


def test_canonical_query_escaping() -> None:
    """RFC 3986 escaping with sorted keys, as the API page's vector shows."""
    q = {"Version": "2023-01-01", "Action": "ListPullToPushTask", "Title": "a b/c+d~e*é=&",
         "Empty": ""}
    assert canonical_query(q) == \
        "Action=ListPullToPushTask&Empty=&Title=a%20b%2Fc%2Bd~e%2A%C3%A9%3D%26&Version=2023-01-01"


def test_host_default_ports_dropped_others_kept() -> None:
    """:80 and :443 are dropped before signing, any other port stays."""
    assert canonical_host("live.volcengineapi.com:443") == "live.volcengineapi.com"
    assert canonical_host("a.test:80") == "a.test"
    assert canonical_host("127.0.0.1:8080") == "127.0.0.1:8080"
    assert canonical_host("[::1]") == "[::1]"


def test_credentials_repr_hides_secrets() -> None:
    """A repr (logs, tracebacks, assertion messages) never shows the secret or the token."""
    text = repr(Credentials(access_key="AKX", secret_key="SECRETVALUE", session_token="TOKENVALUE"))
    assert "AKX" in text and "SECRETVALUE" not in text and "TOKENVALUE" not in text
