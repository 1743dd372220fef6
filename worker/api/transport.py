"""Send step: one signed request on the wire, answered as a value (`Response` or `Failure`).
The only module that imports aiohttp's client (the sandbox imports its server).

`Transport.send` never raises for anything the network or the server does: it returns a
`Response` (whatever the status and body) or a `Failure` (no usable answer, with a detail
that names the cause). aiohttp's exceptions are mapped here, once, most specific first:
certificate errors and DNS errors are ClientConnectorError subclasses, and ServerTimeoutError
is also a TimeoutError, so the order of the checks matters.

What the transport refuses to do on the caller's behalf:
* follow a redirect: the Live API never redirects, and following one would send the signed
  request (and any STS token) to another host and record that host's answer. A 3xx comes back
  as a `Response` with its `Location` redacted; `classify` stops the run on it.
* trust the environment: HTTP(S)_PROXY, NO_PROXY and .netrc are ignored (`trust_env=False`),
  so no variable can route the signed request elsewhere.
* buffer a flood: the body is read up to `max_body_bytes` and the rest is dropped; a body
  that drips in slowly is cut by the attempt's total timeout.

`Reachability` tells an unreachable endpoint (no HTTP answer at all, for long enough) from a
flaky one, so that the runner can stop instead of retrying every item for minutes.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Protocol
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

MAX_BODY_BYTES = 1 << 20  # an API envelope is a few hundred bytes; never buffer a flood
_MAX_HEADER_CHARS = 256  # Retry-After and Location are short; anything longer is hostile
_MAX_URLS = 16  # queries whose URL is kept: the runner sends one per action

FailureKind = Literal[
    "dns", "refused", "connect", "tls", "certificate", "timeout", "disconnected", "protocol"
]

# OpenSSL's reasons when the bytes that came back are not TLS at all, typically a plain HTTP
# server answering our ClientHello with "HTTP/1.1 400": the port speaks http, not https.
_NOT_TLS_REASONS = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "RECORD_LAYER_FAILURE",
        "PACKET_LENGTH_TOO_LONG",
        "HTTP_REQUEST",
        "UNKNOWN_PROTOCOL",
        "WRONG_SSL_VERSION",
        "UNSUPPORTED_PROTOCOL",
    }
)


@dataclass(frozen=True, slots=True)
class Response:
    """An HTTP answer, whatever its status. Header values are bounded; `location` is already
    redacted (no userinfo, no query, no fragment)."""

    status: int
    body: bytes = field(repr=False)
    retry_after: str | None = None
    truncated: bool = False  # the body was longer than the transport's bound
    location: str | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """No usable HTTP answer. `no_answer` is True when no HTTP status line arrived at all
    (DNS, refused, TLS handshake, timeout or disconnect before the answer): the runner counts
    these to tell an unreachable endpoint from a flaky one."""

    kind: FailureKind
    detail: str
    no_answer: bool = True


class Sender(Protocol):
    """What the runner depends on: `Transport`, or a scripted fake in a test."""

    async def send(
        self, query: Mapping[str, str], headers: Mapping[str, str], body: bytes
    ) -> Response | Failure: ...


class Transport:
    """One connection pool to one endpoint, opened and closed by `async with`."""

    def __init__(
        self,
        endpoint: str,
        *,
        timeout_s: float,
        max_connections: int,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self._endpoint = endpoint.rstrip("/") + "/"
        self._timeout_s = timeout_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(10.0, timeout_s))
        self._max_connections = max_connections
        self._max_body_bytes = max_body_bytes
        self._tls = self._endpoint.startswith("https:")
        self._session: aiohttp.ClientSession | None = None
        # The URL with its query, per query: a run sends a few queries (one per action)
        # thousands of times, and aiohttp would parse and encode each one every time.
        self._urls: dict[tuple[tuple[str, str], ...], URL] = {}

    def __repr__(self) -> str:
        return f"<Transport {redact_location(self._endpoint)} open={self._session is not None}>"

    async def __aenter__(self) -> Transport:
        connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=True,
            trust_env=False,  # no proxy, netrc or env var decides where signed requests go
            skip_auto_headers=("User-Agent",),
            headers={"User-Agent": "worker-bulk/0.1"},
        )
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(
        self, query: Mapping[str, str], headers: Mapping[str, str], body: bytes
    ) -> Response | Failure:
        """POST exactly these bytes with exactly these (already signed) headers, once."""
        assert self._session is not None, "use `async with Transport(...)`"
        answered = False  # a status line arrived: whatever fails later, the endpoint is there
        try:
            async with self._session.post(
                self._url(query),
                headers=headers,
                data=body,
                allow_redirects=False,
            ) as resp:
                answered = True
                return await self._read(resp)
        except (aiohttp.ClientError, OSError) as exc:  # TimeoutError and ssl.SSLError are OSErrors
            return self._failure(exc, answered=answered)

    def _url(self, query: Mapping[str, str]) -> URL:
        """The endpoint with this query, built once per query and kept (up to _MAX_URLS)."""
        key = tuple(query.items())
        url = self._urls.get(key)
        if url is None:
            url = URL(self._endpoint).extend_query(key)
            if len(self._urls) < _MAX_URLS:
                self._urls[key] = url
        return url

    async def _read(self, resp: aiohttp.ClientResponse) -> Response:
        """The answer as a value: the body up to max_body_bytes, bounded and redacted headers."""
        data = bytearray()
        truncated = False
        async for chunk in resp.content.iter_chunked(64 * 1024):
            data += chunk
            if len(data) > self._max_body_bytes:
                truncated = True
                break
        location = _header(resp.headers.get("Location"))
        return Response(
            status=resp.status,
            body=bytes(data[: self._max_body_bytes]),
            retry_after=_header(resp.headers.get("Retry-After")),
            truncated=truncated,
            location=redact_location(location) if location else None,
        )

    def _failure(self, exc: aiohttp.ClientError | OSError, *, answered: bool) -> Failure:
        """What aiohttp raised, as a Failure: most specific first (the module docstring says
        why the order matters)."""
        if isinstance(exc, aiohttp.ClientConnectorError):
            return _connect_failure(exc, tls=self._tls)
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return Failure(
                "timeout",
                f"connecting timed out after {self._timeout.connect:g} s "
                "(a firewall dropping packets, or the host is down)",
            )
        if isinstance(exc, (TimeoutError, aiohttp.ServerTimeoutError)):
            if answered:
                return Failure(
                    "timeout",
                    f"the answer's body did not arrive within {self._timeout_s:g} s",
                    no_answer=False,
                )
            return Failure("timeout", f"no HTTP answer within {self._timeout_s:g} s")
        if isinstance(exc, ssl.SSLError):  # a TLS error after the handshake, outside the connector
            return Failure("tls", _tls_detail(exc, None, None), no_answer=not answered)
        # OSError includes aiohttp.ClientOSError (ClientConnectorError was taken above)
        if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, OSError)):
            where = "while reading the answer" if answered else "before any answer"
            return Failure(
                "disconnected",
                f"connection lost {where}: {type(exc).__name__}",
                no_answer=not answered,
            )
        if isinstance(exc, aiohttp.ClientResponseError):
            return Failure(
                "protocol",
                f"the endpoint did not answer valid HTTP: {_one_line(str(exc.message))}",
                no_answer=not answered,
            )
        return Failure(
            "protocol", f"{type(exc).__name__}: {_one_line(str(exc))}", no_answer=not answered
        )


class Reachability:
    """Tells an unreachable endpoint from a flaky one, across all items of a run.

    Any HTTP answer (`saw_answer`, even a 503) resets it; `saw_no_answer` returns True (give
    up) once at least `max_consecutive` tries in a row, over at least `window_s` seconds, got
    no HTTP answer at all. Both bounds: many items failing at once prove nothing about a
    network blip, and one slow try proves nothing about a port. `now` is a monotonic clock
    reading passed in, so this stays pure.
    """

    __slots__ = ("_count", "_first_at", "max_consecutive", "window_s")

    def __init__(self, *, window_s: float = 30.0, max_consecutive: int = 5) -> None:
        if not (window_s >= 0 and max_consecutive >= 1):
            raise ValueError("Reachability needs window_s >= 0 and max_consecutive >= 1")
        self.window_s = window_s
        self.max_consecutive = max_consecutive
        self._count = 0
        self._first_at = 0.0

    def __repr__(self) -> str:
        return (
            f"<Reachability {self._count}/{self.max_consecutive} without an answer, "
            f"window {self.window_s:g} s>"
        )

    def saw_answer(self) -> None:
        self._count = 0

    def saw_no_answer(self, now: float) -> bool:
        """Count one try without an HTTP answer; True when it is time to give up."""
        if self._count == 0:
            self._first_at = now
        self._count += 1
        return self._count >= self.max_consecutive and now - self._first_at >= self.window_s


def _connect_failure(exc: aiohttp.ClientConnectorError, *, tls: bool) -> Failure:
    """A connection that was never made: certificate, TLS, DNS, then the socket's own error
    (certificate, TLS and DNS errors are all ClientConnectorError subclasses: checked first)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cert = exc.certificate_error
        why = getattr(cert, "verify_message", None) or type(cert).__name__
        return Failure(
            "certificate", f"the TLS certificate of {exc.host}:{exc.port} is not trusted: {why}"
        )
    if isinstance(exc, aiohttp.ClientSSLError):
        return Failure("tls", _tls_detail(exc, exc.host, exc.port))
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return Failure(
            "dns",
            f"the DNS name {exc.host!r} was not resolved "
            f"({exc.strerror or 'no address'}): a typo in --endpoint?",
        )
    if isinstance(exc.os_error, ConnectionResetError) and tls:
        return Failure(
            "tls",
            f"{exc.host}:{exc.port} reset the connection during "
            "the TLS handshake (does it speak TLS on that port?)",
        )
    if isinstance(exc.os_error, ConnectionRefusedError):
        return Failure(
            "refused",
            f"connection refused by {exc.host}:{exc.port}: nothing listens on that port",
        )
    return Failure(
        "connect",
        f"cannot connect to {exc.host}:{exc.port}: {exc.strerror or type(exc.os_error).__name__}",
    )


def _tls_detail(exc: BaseException, host: str | None, port: int | None) -> str:
    """Say what a failed TLS handshake most likely means, not just that it failed."""
    # aiohttp's connector errors carry the ssl.SSLError (with its `reason`) as os_error.
    inner = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    reason = getattr(inner, "reason", None)
    where = f" with {host}:{port}" if host else ""
    if reason in _NOT_TLS_REASONS:
        return (
            f"TLS handshake{where} failed ({reason}): the endpoint does not speak TLS on "
            "that port (is it http://?)"
        )
    if isinstance(inner, ssl.SSLEOFError) or reason == "UNEXPECTED_EOF_WHILE_READING":
        return (
            f"TLS handshake{where} failed: the server closed the connection during the "
            "handshake (does it speak TLS on that port?)"
        )
    return f"TLS handshake{where} failed: {reason or type(inner).__name__}"


def _one_line(text: str) -> str:
    return " ".join(text[:400].split())[:200]


def _header(value: str | None) -> str | None:
    return value[:_MAX_HEADER_CHARS] if value is not None else None


def redact_location(url: str) -> str:
    """A URL fit to print and store: scheme, host, port and path; userinfo, query and
    fragment dropped (they are where tokens and passwords ride)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:  # a port that is not a number, a broken IPv6 literal
        return "<unparseable URL>"
    if ":" in host:
        host = f"[{host}]"
    origin = (f"{parts.scheme}:" if parts.scheme else "") + (f"//{host}{port}" if host else "")
    return (origin + parts.path)[:_MAX_HEADER_CHARS] or "<empty>"
