"""Sign step: the Volcengine V4 (HMAC-SHA256) signature, byte-exact with the official SDK.

Pure: the request, the credentials and the time come in, headers come out. The sandbox uses
the same canonical-request code to verify what it receives, and the tests hold both to the
official SDK's known answers.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote

from worker.api import SERVICE

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
    return "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items())
    )


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


def signing_key(secret: str, date: str, region: str, service: str = SERVICE) -> bytes:
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
        method=method, path=path, query=query, headers=headers, signed=signed,
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


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()
