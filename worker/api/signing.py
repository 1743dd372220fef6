"""Sign step: the Volcengine V4 (HMAC-SHA256) signature, byte-exact with the official SDK.

Pure: the request, the credentials and the time come in, headers come out. `verify` is the
other side (what the gateway does, used by the sandbox): it rebuilds the same canonical
request from what arrived, so the two can only agree or both be wrong, and the tests hold
`sign` to the official SDK's known answers. The steps and the vectors: docs/api.md (*Signing*).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final
from urllib.parse import quote

from worker.api.spec import SERVICE

ALGORITHM = "HMAC-SHA256"


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    access_key: str
    # repr=False: a secret must never reach a log line, a traceback or a test failure message.
    secret_key: str = field(repr=False)
    session_token: str = field(default="", repr=False)


def x_date(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def canonical_query(query: Mapping[str, str]) -> str:
    """Keys sorted, RFC 3986 escaping: only A-Za-z0-9-_.~ stay as they are, space is %20."""
    return _canonical_query(tuple(sorted(query.items())))


@functools.lru_cache(maxsize=64)
def _canonical_query(items: tuple[tuple[str, str], ...]) -> str:
    # Cached: a run signs thousands of requests with the same few queries (one per action).
    return "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in items)


def canonical_host(host: str) -> str:
    """The SDK drops a default port (80, 443) from Host before signing; any other stays."""
    name, sep, port = host.rpartition(":")
    if sep and port in ("80", "443"):
        return name
    return host


def canonical_request(
    *,
    method: str,
    path: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    signed: list[str],
    body_sha256: str,
) -> str:
    """`headers` are keyed by lowercase name; `signed` is the sorted lowercase list."""
    block = "".join(f"{name}:{headers[name]}\n" for name in signed)
    return "\n".join(
        [method, path or "/", canonical_query(query), block, ";".join(signed), body_sha256]
    )


@functools.lru_cache(maxsize=8)
def signing_key(secret: str, date: str, region: str, service: str = SERVICE) -> bytes:
    # Cached: four HMACs that change once a day per key (the SDKs cache it too). The cache
    # holds the derived key and the secret it came from; both live in this process anyway.
    k = _hmac(secret.encode(), date)
    for part in (region, service, "request"):
        k = _hmac(k, part)
    return k


def string_to_sign(xdate: str, scope: str, canonical: str) -> str:
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return "\n".join([ALGORITHM, xdate, scope, digest])


def sign(
    *,
    method: str,
    host: str,
    path: str,
    query: Mapping[str, str],
    content_type: str,
    body: bytes,
    credentials: Credentials,
    region: str,
    now: datetime,
    service: str = SERVICE,
) -> dict[str, str]:
    """The headers to send with this exact body: Host, Content-Type, X-Date, X-Content-Sha256,
    X-Security-Token (with STS) and Authorization."""
    xdate = x_date(now)
    body_sha256 = hashlib.sha256(body).hexdigest()
    headers = {
        "content-type": content_type,
        "host": canonical_host(host),
        "x-content-sha256": body_sha256,
        "x-date": xdate,
    }
    if credentials.session_token:
        headers["x-security-token"] = credentials.session_token
    signed = sorted(headers)
    canonical = canonical_request(
        method=method,
        path=path,
        query=query,
        headers=headers,
        signed=signed,
        body_sha256=body_sha256,
    )
    scope = f"{xdate[:8]}/{region}/{service}/request"
    key = signing_key(credentials.secret_key, xdate[:8], region, service)
    signature = hmac.new(key, string_to_sign(xdate, scope, canonical).encode(), hashlib.sha256)
    out = {
        "Host": headers["host"],
        "Content-Type": content_type,
        "X-Date": xdate,
        "X-Content-Sha256": body_sha256,
        "Authorization": (
            f"{ALGORITHM} Credential={credentials.access_key}/{scope}, "
            f"SignedHeaders={';'.join(signed)}, Signature={signature.hexdigest()}"
        ),
    }
    if credentials.session_token:
        out["X-Security-Token"] = credentials.session_token
    return out


# What `sign` writes; anything else (extra spaces, another algorithm) is not our scheme.
_AUTH_RE: Final = re.compile(
    r"HMAC-SHA256 Credential=(?P<ak>[^/\s]+)/(?P<date>\d{8})/(?P<region>[^/\s]+)/"
    r"(?P<service>[^/\s]+)/request, SignedHeaders=(?P<signed>[a-z0-9;-]+), "
    r"Signature=(?P<sig>[0-9a-f]{64})"
)
# Headers a signature must cover: without them the body or the time could be swapped.
_MUST_SIGN: Final = frozenset({"host", "x-date", "x-content-sha256"})


@dataclass(frozen=True, slots=True)
class Verified:
    """The request was signed by the holder of this access key's secret."""

    access_key: str


@dataclass(frozen=True, slots=True)
class Refused:
    """Why a request's signature is not accepted: the gateway's error code and a message.
    `access_key` is the key the request claimed ("" when it named none)."""

    code: str  # MissingAuthenticationToken, InvalidAccessKey, InvalidTimestamp,
    # SignatureDoesNotMatch
    message: str
    access_key: str = ""


def verify(
    *,
    method: str,
    path: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    body: bytes,
    secret_for: Callable[[str], str | None],
    now: datetime,
    max_skew_s: float,
    region: str,
    service: str = SERVICE,
) -> Verified | Refused:
    """Check a received request as the gateway does: the scope (date, region, service), the
    signed header list, `X-Date` within `max_skew_s` of `now`, the body hash, then the
    signature itself. `headers` are keyed by lowercase name. Checks run cheapest first and
    the first failure is the answer."""
    m = _AUTH_RE.fullmatch(headers.get("authorization", ""))
    if m is None:
        return Refused("MissingAuthenticationToken", "the request is not signed")
    ak = m["ak"]
    secret = secret_for(ak)
    if secret is None:
        return Refused("InvalidAccessKey", f"the access key {ak} does not exist", ak)
    xdate = headers.get("x-date", "")
    try:
        stamp = datetime.strptime(xdate, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return Refused("InvalidTimestamp", "X-Date is missing or malformed", ak)
    skew = abs((now - stamp).total_seconds())
    if skew > max_skew_s:
        return Refused("InvalidTimestamp", f"X-Date is {skew:.0f}s away from the server time", ak)
    signed = m["signed"].split(";")
    if (
        m["date"] != xdate[:8]
        or m["region"] != region
        or m["service"] != service
        or signed != sorted(set(signed))
        or not _MUST_SIGN.issubset(signed)
        # A token sent but not signed could be swapped by anyone on the path.
        or ("x-security-token" in headers and "x-security-token" not in signed)
    ):
        return Refused("SignatureDoesNotMatch", "the credential scope or header list is wrong", ak)
    body_sha256 = hashlib.sha256(body).hexdigest()
    if headers.get("x-content-sha256") != body_sha256:
        return Refused("SignatureDoesNotMatch", "X-Content-Sha256 is not the body's hash", ak)
    covered: dict[str, str] = {}
    for name in signed:
        if name not in headers:
            return Refused("SignatureDoesNotMatch", f"signed header {name} is missing", ak)
        value = headers[name].strip()
        covered[name] = canonical_host(value) if name == "host" else value
    canonical = canonical_request(
        method=method,
        path=path,
        query=query,
        headers=covered,
        signed=signed,
        body_sha256=body_sha256,
    )
    scope = f"{m['date']}/{m['region']}/{m['service']}/request"
    key = signing_key(secret, m["date"], m["region"], m["service"])
    want = hmac.new(key, string_to_sign(xdate, scope, canonical).encode(), hashlib.sha256)
    if not hmac.compare_digest(want.hexdigest(), m["sig"]):
        return Refused("SignatureDoesNotMatch", "the signature does not match", ak)
    return Verified(ak)


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()
