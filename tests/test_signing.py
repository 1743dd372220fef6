"""The signer is byte-exact with the official SDK (volcengine.auth.SignerV4)."""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from volcengine.auth.SignerV4 import SignerV4
from volcengine.auth.SignParam import SignParam
from volcengine.Credentials import Credentials as SdkCredentials

from worker.api.signing import (
    Credentials,
    Refused,
    Verified,
    canonical_host,
    canonical_query,
    sign,
    verify,
)

WHEN = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
QUERY = {"Action": "CreatePullToPushGroup", "Version": "2023-01-01"}

KNOWN = [
    (
        b'{"Name": "RelayGroup001", "ProjectName": "default"}',
        "",
        "f00bf3c3fc1e325ae51473eeb9d36ef610030139110d5aeb8416114ccc802d51",
    ),
    (
        b'{"Name":"RelayGroup001","ProjectName":"default"}',
        "",
        "b291a0a0ed15f02a2e19309fa32e6ae600a03f9672c8e58fb469d294de4db60c",
    ),
    (
        b'{"Name":"RelayGroup001","ProjectName":"default"}',
        "STSTOKEN",
        "9207eeb2cb32ae6594a480a62eb2475f7e7830dcc22807a0b716607443a522c3",
    ),
    (
        '{"Name":"中文群组","ProjectName":"default"}'.encode(),
        "",
        "39f0dffae4d5ead195d65e234b37190106c95b7930ad8dcc160a62a9d24c2789",
    ),
]


def _ours(body: bytes, ak: str, sk: str, token: str, host: str, when: datetime) -> dict[str, str]:
    return sign(
        method="POST",
        host=host,
        path="/",
        query=QUERY,
        content_type="application/json",
        body=body,
        credentials=Credentials(access_key=ak, secret_key=sk, session_token=token),
        region="cn-north-1",
        now=when,
    )


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
        + (
            "content-type;host;x-content-sha256;x-date;x-security-token"
            if token
            else "content-type;host;x-content-sha256;x-date"
        )
        + f", Signature={signature}"
    )
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
            for i in range(rng.randint(1, 4))
        )
        parts.append(f'"Tags":[{tags}]')
    return ("{" + ",".join(parts) + "}").encode()


def test_random_requests_match_sdk() -> None:
    """200 random requests (Chinese names, tags, tokens, hosts with ports) sign identically."""
    rng = random.Random(20261129)
    for i in range(200):
        body = _random_body(rng)
        token = rng.choice(["", "", "STS" + "x" * rng.randint(5, 60)])
        host = rng.choice(
            ["live.volcengineapi.com", "127.0.0.1:8080", "localhost:443", "example.test:80"]
        )
        ak = f"AK{rng.randint(0, 10**9)}"
        sk = "".join(rng.choice("abcdefABCDEF0123456789+/") for _ in range(40))
        when = WHEN + timedelta(seconds=rng.randint(0, 10**8))
        ours = _ours(body, ak, sk, token, host, when)["Authorization"]
        assert ours == _sdk(body, ak, sk, token, host, when), f"request {i}"


def test_canonical_query_escaping() -> None:
    """RFC 3986 escaping with sorted keys, as the API page's vector shows."""
    q = {
        "Version": "2023-01-01",
        "Action": "ListPullToPushTask",
        "Title": "a b/c+d~e*é=&",
        "Empty": "",
    }
    assert (
        canonical_query(q)
        == "Action=ListPullToPushTask&Empty=&Title=a%20b%2Fc%2Bd~e%2A%C3%A9%3D%26&Version=2023-01-01"
    )


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


# -- verify: the gateway's side ------------------------------------------------------------

SECRETS = {"AKTEST": "SKTEST", "AKSTS": "SKSTS"}


def _received(headers: dict[str, str]) -> dict[str, str]:
    """Headers as a server sees them: keyed by lowercase name."""
    return {k.lower(): v for k, v in headers.items()}


def _verify(
    headers: dict[str, str],
    body: bytes,
    *,
    now: datetime = WHEN,
    query: dict[str, str] | None = None,
    region: str = "cn-north-1",
    secrets: Callable[[str], str | None] = SECRETS.get,
) -> Verified | Refused:
    return verify(
        method="POST",
        path="/",
        query=query or QUERY,
        headers=_received(headers),
        body=body,
        secret_for=secrets,
        now=now,
        max_skew_s=900,
        region=region,
    )


def test_verify_accepts_what_sign_produces() -> None:
    """200 random signed requests (tokens, hosts with ports, Chinese bodies) verify, naming
    the access key that signed them."""
    rng = random.Random(7)
    for i in range(200):
        body = _random_body(rng)
        token = rng.choice(["", "STS" + "y" * rng.randint(1, 40)])
        ak = rng.choice(list(SECRETS))
        host = rng.choice(["live.volcengineapi.com", "127.0.0.1:8080", "localhost:443"])
        when = WHEN + timedelta(seconds=rng.randint(0, 10**8))
        headers = _ours(body, ak, SECRETS[ak], token, host, when)
        assert _verify(headers, body, now=when) == Verified(ak), f"request {i}"


def test_verify_accepts_what_the_official_sdk_signs() -> None:
    """A request signed by the SDK's SignerV4 (not by us) verifies."""
    body = '{"Name":"中文群组","ProjectName":"default"}'.encode()
    host = "127.0.0.1:8080"
    param = SignParam()
    param.set_method("POST")
    param.set_host(host)
    param.set_path("/")
    param.set_query(dict(QUERY))
    param.set_body(body.decode())
    param.set_date(WHEN)
    param.set_header_list(OrderedDict([("Content-Type", "application/json"), ("Host", host)]))
    result = SignerV4.sign_only(param, SdkCredentials("AKTEST", "SKTEST", "live", "cn-north-1"))
    headers = {
        "Host": host,
        "Content-Type": "application/json",
        "X-Date": result.xdate,
        "X-Content-Sha256": result.xContextSha256,
        "Authorization": result.authorization,
    }
    assert _verify(headers, body) == Verified("AKTEST")


def _tampered(change: Callable[[dict[str, str]], None]) -> dict[str, str]:
    headers = _ours(BODY, "AKTEST", "SKTEST", "", "live.volcengineapi.com", WHEN)
    change(headers)
    return headers


BODY = b'{"Name":"RelayGroup001","ProjectName":"default"}'


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (lambda h: h.pop("Authorization"), "MissingAuthenticationToken"),
        (lambda h: h.update(Authorization="Bearer abc"), "MissingAuthenticationToken"),
        (
            lambda h: h.update(Authorization=h["Authorization"].replace("AKTEST", "AKNOPE")),
            "InvalidAccessKey",
        ),
        (lambda h: h.pop("X-Date"), "InvalidTimestamp"),
        (lambda h: h.update({"X-Date": "20240102T030405"}), "InvalidTimestamp"),
        (lambda h: h.update({"Content-Type": "text/plain"}), "SignatureDoesNotMatch"),
        (lambda h: h.update(Host="other.example"), "SignatureDoesNotMatch"),
        (lambda h: h.update({"X-Content-Sha256": "0" * 64}), "SignatureDoesNotMatch"),
        (lambda h: h.update({"X-Security-Token": "smuggled"}), "SignatureDoesNotMatch"),
        (
            lambda h: h.update(
                Authorization=h["Authorization"].replace("content-type;host;", "host;")
            ),
            "SignatureDoesNotMatch",
        ),
        (
            lambda h: h.update(
                Authorization=h["Authorization"].replace(
                    "host;x-content-sha256;x-date", "host;x-content-sha256"
                )
            ),
            "SignatureDoesNotMatch",
        ),
        (
            lambda h: h.update(Authorization=h["Authorization"][:-4] + "0000"),
            "SignatureDoesNotMatch",
        ),
    ],
)
def test_verify_refuses_each_tampering(change: Callable[[dict[str, str]], None], code: str) -> None:
    """Every header that matters is bound by the signature; each change is refused with the
    gateway's code."""
    result = _verify(_tampered(change), BODY)
    assert isinstance(result, Refused) and result.code == code, result


def test_verify_refuses_another_body_query_region_secret_or_time() -> None:
    """The body, the query, the region, the secret and the clock are all part of the check."""
    headers = _ours(BODY, "AKTEST", "SKTEST", "", "live.volcengineapi.com", WHEN)
    assert _verify(headers, BODY) == Verified("AKTEST")
    cases: list[tuple[Verified | Refused, str]] = [
        (_verify(headers, BODY.replace(b"001", b"002")), "SignatureDoesNotMatch"),
        (
            _verify(headers, BODY, query={**QUERY, "Action": "DeletePullToPushGroup"}),
            "SignatureDoesNotMatch",
        ),
        (_verify(headers, BODY, region="cn-beijing"), "SignatureDoesNotMatch"),
        (_verify(headers, BODY, secrets={"AKTEST": "other"}.get), "SignatureDoesNotMatch"),
        (_verify(headers, BODY, now=WHEN + timedelta(seconds=901)), "InvalidTimestamp"),
        (_verify(headers, BODY, now=WHEN - timedelta(seconds=901)), "InvalidTimestamp"),
    ]
    for result, code in cases:
        assert isinstance(result, Refused) and result.code == code, result
    assert _verify(headers, BODY, now=WHEN + timedelta(seconds=900)) == Verified("AKTEST")
    refused = _verify(headers, BODY, region="cn-beijing")
    assert isinstance(refused, Refused) and refused.access_key == "AKTEST"
