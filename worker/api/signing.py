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
    scope = _scope(xdate[:8], region, service)
    signature = _signature(
        credentials.secret_key,
        xdate=xdate,
        date=xdate[:8],
        region=region,
        service=service,
        canonical=canonical,
    )
    out = {
        "Host": headers["host"],
        "Content-Type": content_type,
        "X-Date": xdate,
        "X-Content-Sha256": body_sha256,
        "Authorization": (
            f"{ALGORITHM} Credential={credentials.access_key}/{scope}, "
            f"SignedHeaders={';'.join(signed)}, Signature={signature}"
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
    if (late := _timestamp_refusal(xdate, now, max_skew_s)) is not None:
        return Refused("InvalidTimestamp", late, ak)
    signed = m["signed"].split(";")
    if not _scope_fits(m, xdate, signed, headers, region=region, service=service):
        return Refused("SignatureDoesNotMatch", "the credential scope or header list is wrong", ak)
    body_sha256 = hashlib.sha256(body).hexdigest()
    if headers.get("x-content-sha256") != body_sha256:
        return Refused("SignatureDoesNotMatch", "X-Content-Sha256 is not the body's hash", ak)
    if (missing := next((n for n in signed if n not in headers), None)) is not None:
        return Refused("SignatureDoesNotMatch", f"signed header {missing} is missing", ak)
    canonical = canonical_request(
        method=method,
        path=path,
        query=query,
        headers=_covered(headers, signed),
        signed=signed,
        body_sha256=body_sha256,
    )
    want = _signature(
        secret,
        xdate=xdate,
        date=m["date"],
        region=m["region"],
        service=m["service"],
        canonical=canonical,
    )
    if not hmac.compare_digest(want, m["sig"]):
        return Refused("SignatureDoesNotMatch", "the signature does not match", ak)
    return Verified(ak)


def _timestamp_refusal(xdate: str, now: datetime, max_skew_s: float) -> str | None:
    """Why `X-Date` is not acceptable at `now`, or None when it is."""
    try:
        stamp = datetime.strptime(xdate, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return "X-Date is missing or malformed"
    skew = abs((now - stamp).total_seconds())
    if skew > max_skew_s:
        return f"X-Date is {skew:.0f}s away from the server time"
    return None


def _scope_fits(
    m: re.Match[str],
    xdate: str,
    signed: list[str],
    headers: Mapping[str, str],
    *,
    region: str,
    service: str,
) -> bool:
    """The credential scope is this server's and today's (by X-Date), and the signed header
    list is sorted, without repeats, and covers what must be covered."""
    return (
        m["date"] == xdate[:8]
        and m["region"] == region
        and m["service"] == service
        and signed == sorted(set(signed))
        and _MUST_SIGN.issubset(signed)
        # A token sent but not signed could be swapped by anyone on the path.
        and ("x-security-token" not in headers or "x-security-token" in signed)
    )


def _covered(headers: Mapping[str, str], signed: list[str]) -> dict[str, str]:
    """The signed headers' values as the signer saw them (trimmed; Host without a default
    port). Every name in `signed` is in `headers`."""
    covered = {name: headers[name].strip() for name in signed}
    covered["host"] = canonical_host(covered["host"])
    return covered


def _scope(date: str, region: str, service: str) -> str:
    return f"{date}/{region}/{service}/request"


def _signature(
    secret: str, *, xdate: str, date: str, region: str, service: str, canonical: str
) -> str:
    """The hex HMAC of the string to sign, under the key derived for this date, region and
    service: the one computation `sign` and `verify` must share."""
    key = signing_key(secret, date, region, service)
    to_sign = string_to_sign(xdate, _scope(date, region, service), canonical)
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()
