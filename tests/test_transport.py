"""The transport against raw asyncio servers on 127.0.0.1: what it refuses to do, and what each
kind of network failure becomes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec

import pytest

from worker.api.classify import Abort, Retry, classify
from worker.api.transport import (
    MAX_BODY_BYTES,
    Failure,
    Reachability,
    Response,
    Sender,
    Transport,
    redact_location,
)

QUERY = {"Action": "CreatePullToPushGroup", "Version": "2023-01-01"}
HEADERS = {"Content-Type": "application/json", "Authorization": "HMAC-SHA256 secret-signature"}
BODY = b'{"Name":"A1"}'
ENVELOPE = b'{"ResponseMetadata":{"RequestId":"r1"}}'

P = ParamSpec("P")


def run_async(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Run an async test in a fresh event loop (no pytest plugin needed)."""

    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Raw:
    """A raw TCP server: counts connections, keeps the requests it read, runs `handler`."""

    port: int
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def raw_server(handler: Handler, *, tls: ssl.SSLContext | None = None) -> AsyncIterator[Raw]:
    raw = Raw(port=0)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw.connections += 1
        try:
            await handler(reader, writer)
        except (ConnectionError, ssl.SSLError):
            pass  # the client went away or failed its handshake: that is the test's business
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
    raw.port = server.sockets[0].getsockname()[1]
    async with server:
        yield raw
        server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


def answer(status: int, body: bytes = ENVELOPE, *headers: str) -> Callable[[Raw], Handler]:
    def make(raw: Raw) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            raw.requests.append(await read_request(reader))
            lines = [
                f"HTTP/1.1 {status} X",
                f"Content-Length: {len(body)}",
                "Connection: close",
                *headers,
            ]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            await writer.drain()

        return handler

    return make


@contextlib.asynccontextmanager
async def scripted(make: Callable[[Raw], Handler]) -> AsyncIterator[Raw]:
    """A raw server whose handler can see the server's own record."""
    holder: list[Raw] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await make(holder[0])(reader, writer)

    async with raw_server(handler) as raw:
        holder.append(raw)
        yield raw


async def send(url: str, *, timeout_s: float = 5.0) -> Response | Failure:
    async with Transport(url, timeout_s=timeout_s, max_connections=2) as transport:
        return await transport.send(QUERY, HEADERS, BODY)


@pytest.mark.parametrize("status", [300, 301, 302, 303, 304, 305, 307, 308, 399])
@run_async
async def test_redirects_are_never_followed(status: int) -> None:
    """A 3xx comes back as itself; the host it points to receives nothing, and classify stops
    the run with the Location's userinfo and query gone."""
    async with raw_server(answer(200)(Raw(0))) as elsewhere:
        target = f"http://user:pw@127.0.0.1:{elsewhere.port}/steal?token=STS-SECRET#frag"
        async with scripted(answer(status, b"", f"Location: {target}")) as endpoint:
            result = await send(endpoint.url)
            assert len(endpoint.requests) == 1
        assert elsewhere.connections == 0
    assert isinstance(result, Response) and result.status == status
    assert result.location == f"http://127.0.0.1:{elsewhere.port}/steal"
    verdict = classify(result)
    assert isinstance(verdict, Abort) and "never redirects" in verdict.hint
    assert f"127.0.0.1:{elsewhere.port}/steal" in verdict.answer.message
    assert "STS-SECRET" not in repr(verdict) and "pw" not in verdict.answer.message


@run_async
async def test_proxy_variables_are_not_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP(S)_PROXY in the environment does not route the signed request anywhere else."""
    async with raw_server(answer(200)(Raw(0))) as proxy, scripted(answer(200)) as endpoint:
        for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
            monkeypatch.setenv(var, proxy.url)
        for var in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(var, raising=False)
        result = await send(endpoint.url)
        assert proxy.connections == 0
    assert isinstance(result, Response) and result.status == 200
    assert endpoint.requests and endpoint.requests[0].endswith(BODY)


@run_async
async def test_a_slow_drip_body_is_cut_by_the_timeout() -> None:
    """A body that arrives a byte at a time never holds an attempt past its timeout; the
    status line did arrive, so this is not 'no answer'."""

    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        for _ in range(100000):
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(0.05)

    async with raw_server(drip) as endpoint:
        result = await send(endpoint.url, timeout_s=0.5)
    assert isinstance(result, Failure) and result.kind == "timeout"
    assert result.no_answer is False and "body" in result.detail


@run_async
async def test_a_huge_body_is_bounded() -> None:
    """A 3 MiB answer is read up to the bound and marked truncated, which classify retries."""
    async with scripted(answer(200, b"{" * (3 * MAX_BODY_BYTES))) as endpoint:
        result = await send(endpoint.url)
    assert isinstance(result, Response) and result.truncated
    assert len(result.body) == MAX_BODY_BYTES
    assert isinstance(classify(result), Retry)


@run_async
async def test_headers_from_the_server_are_bounded() -> None:
    """A 5000-character Retry-After is cut before anyone parses it."""
    async with scripted(answer(503, b"", "Retry-After: " + "9" * 5000)) as endpoint:
        result = await send(endpoint.url)
    assert isinstance(result, Response) and result.retry_after is not None
    assert len(result.retry_after) <= 256


@run_async
async def test_https_to_a_plain_http_port_says_so() -> None:
    """https:// against a plain HTTP server is a TLS handshake failure whose detail says the
    port does not speak TLS (not 'certificate not trusted'); no HTTP answer was received."""

    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # the ClientHello, which a plain server cannot parse
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with raw_server(plain) as endpoint:
        result = await send(f"https://127.0.0.1:{endpoint.port}")
    assert isinstance(result, Failure) and result.kind == "tls" and result.no_answer
    assert "does not speak TLS" in result.detail and "http://" in result.detail
    verdict = classify(result)
    assert isinstance(verdict, Retry) and verdict.no_answer
    assert "certificate" not in verdict.answer.message


@run_async
async def test_an_untrusted_certificate_stops_the_run(tmp_path: Path) -> None:
    """A self-signed certificate is a certificate failure, and classify aborts with its own
    hint; the TLS server never sees a request."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    seen: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))

    async with raw_server(record, tls=context) as endpoint:
        result = await send(f"https://127.0.0.1:{endpoint.port}")
    assert isinstance(result, Failure) and result.kind == "certificate"
    assert "not trusted" in result.detail
    verdict = classify(result)
    assert isinstance(verdict, Abort) and "certificate" in verdict.hint
    assert seen == []


@run_async
async def test_a_closed_port_is_connection_refused() -> None:
    """Nothing listening: 'connection refused', named with host and port, no answer."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = await send(f"http://127.0.0.1:{port}")
    assert isinstance(result, Failure) and result.kind == "refused" and result.no_answer
    assert f"127.0.0.1:{port}" in result.detail and "refused" in result.detail


@run_async
async def test_an_unknown_host_is_a_dns_failure() -> None:
    """A name that cannot resolve (.invalid never does) says so, naming the host."""
    result = await send("http://no-such-host.invalid")
    assert isinstance(result, Failure) and result.kind == "dns" and result.no_answer
    assert "no-such-host.invalid" in result.detail and "not resolved" in result.detail


@run_async
async def test_a_server_that_never_answers_times_out_without_an_answer() -> None:
    """Accepted but never answered: a timeout with no HTTP answer."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    async with raw_server(silent) as endpoint:
        result = await send(endpoint.url, timeout_s=0.3)
    assert isinstance(result, Failure) and result.kind == "timeout" and result.no_answer
    assert "no HTTP answer" in result.detail


@run_async
async def test_a_connection_closed_before_the_answer_is_no_answer() -> None:
    """The server reads the request and hangs up: lost before any answer."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with raw_server(hang_up) as endpoint:
        result = await send(endpoint.url)
    assert isinstance(result, Failure) and result.kind == "disconnected" and result.no_answer
    assert "before any answer" in result.detail


@run_async
async def test_a_non_http_answer_is_a_protocol_failure() -> None:
    """Bytes that are not HTTP (an SSH banner, say) are a protocol failure with no answer."""

    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()

    async with raw_server(banner) as endpoint:
        result = await send(endpoint.url)
    assert isinstance(result, Failure) and result.no_answer
    assert result.kind in ("protocol", "disconnected")


@run_async
async def test_the_exact_bytes_and_headers_are_sent() -> None:
    """The body goes out byte for byte, with the signed headers and the query."""
    async with scripted(answer(200)) as endpoint:
        result = await send(endpoint.url)
    assert isinstance(result, Response) and result.body == ENVELOPE
    request = endpoint.requests[0]
    assert request.startswith(b"POST /?Action=CreatePullToPushGroup&Version=2023-01-01 ")
    assert b"Authorization: HMAC-SHA256 secret-signature" in request
    assert request.endswith(b"\r\n\r\n" + BODY)


@run_async
async def test_each_request_carries_its_own_query() -> None:
    """Queries seen before and new ones (the URL per query is kept) go out as given, encoded
    as aiohttp encodes `params` (the gateway decodes them before it checks the signature)."""
    other = {"Action": "ListPullToPushGroup", "Version": "2023-01-01", "X": "a b/c"}
    async with (
        scripted(answer(200)) as endpoint,
        Transport(endpoint.url, timeout_s=5, max_connections=2) as transport,
    ):
        for query in (QUERY, other, QUERY, other):
            assert isinstance(await transport.send(query, HEADERS, BODY), Response)
    lines = [r.split(b" HTTP/1.1", 1)[0] for r in endpoint.requests]
    create = b"POST /?Action=CreatePullToPushGroup&Version=2023-01-01"
    listing = b"POST /?Action=ListPullToPushGroup&Version=2023-01-01&X=a+b/c"
    assert lines == [create, listing, create, listing]


class ScriptedSender:
    """The shape a runner test passes in instead of a Transport."""

    def __init__(self, results: list[Response | Failure]) -> None:
        self.results = results

    async def send(
        self, query: Mapping[str, str], headers: Mapping[str, str], body: bytes
    ) -> Response | Failure:
        return self.results.pop(0)


@run_async
async def test_a_scripted_fake_is_a_sender() -> None:
    """Transport and a scripted fake both satisfy the Sender protocol the runner takes."""
    senders: list[Sender] = [
        ScriptedSender([Failure("refused", "x")]),
        Transport("http://127.0.0.1:1", timeout_s=1, max_connections=1),
    ]
    assert isinstance(await senders[0].send(QUERY, HEADERS, BODY), Failure)
    assert "open=False" in repr(senders[1])


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://u:p@evil.example:8443/a/b?X-Security-Token=t#f", "https://evil.example:8443/a/b"),
        ("/relative/path?q=1", "/relative/path"),
        ("//evil.example/x?y", "//evil.example/x"),
        ("http://[::1]:80/", "http://[::1]:80/"),
        ("http://host:notaport/", "<unparseable URL>"),
        ("?only=query", "<empty>"),
    ],
)
def test_locations_are_redacted(url: str, shown: str) -> None:
    """A Location is shown without userinfo, query or fragment, whatever its form."""
    assert redact_location(url) == shown


def test_reachability_gives_up_after_tries_and_time() -> None:
    """Giving up needs both bounds: N tries in a row without an answer, over T seconds."""
    reach = Reachability(window_s=30.0, max_consecutive=5)
    assert [reach.saw_no_answer(t) for t in (0, 1, 2, 3)] == [False] * 4
    assert reach.saw_no_answer(4) is False  # 5 tries, but only 4 s
    assert reach.saw_no_answer(29.9) is False
    assert reach.saw_no_answer(30.0) is True
    assert "7/5" in repr(reach)
    few = Reachability(window_s=10.0, max_consecutive=3)
    assert [few.saw_no_answer(t) for t in (0.0, 100.0, 200.0)] == [False, False, True]


def test_reachability_is_reset_by_any_http_answer() -> None:
    """An HTTP answer between failures starts the count (and the window) again."""
    reach = Reachability(window_s=10.0, max_consecutive=3)
    assert [reach.saw_no_answer(t) for t in (0.0, 5.0)] == [False, False]
    reach.saw_answer()
    assert [reach.saw_no_answer(t) for t in (10.0, 11.0, 19.0, 20.0)] == [False] * 3 + [True]
    reach.saw_answer()
    assert "0/3" in repr(reach)


@pytest.mark.parametrize(("window", "tries"), [(-1.0, 5), (math.nan, 5), (30.0, 0)])
def test_reachability_rejects_nonsense_bounds(window: float, tries: int) -> None:
    """A negative or NaN window, or fewer than one try, is a programming error."""
    with pytest.raises(ValueError, match="Reachability"):
        Reachability(window_s=window, max_consecutive=tries)
