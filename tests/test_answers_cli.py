"""What the server says, end to end: the real CLI against raw HTTP servers on 127.0.0.1 that
answer what the Live API never would (redirects, hostile text, proxies' codes)."""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli_env, ledger_records, names, run_worker, write_manifest

pytestmark = pytest.mark.slow  # real processes: `pytest -m 'not slow'` skips them

# request number (0-based) -> (status, extra header lines, body)
Script = Callable[[int], tuple[int, list[str], bytes]]


def envelope(code: str | None = None, message: str = "") -> bytes:
    meta: dict[str, Any] = {"RequestId": "rid-raw", "Action": "CreatePullToPushGroup"}
    if code is not None:
        meta["Error"] = {"Code": code, "Message": message}
    return json.dumps({"ResponseMetadata": meta}, ensure_ascii=False).encode()


class RawHTTP:
    """A raw HTTP/1.1 server in a thread: one answer per connection, as `script` says, and a
    count of the requests it read."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = self.rfile.readline(65536)
                    if not line:
                        return
                    head += line
                length = next(
                    (
                        int(h.split(b":", 1)[1])
                        for h in head.split(b"\r\n")
                        if h.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                body = self.rfile.read(length)
                with outer._lock:
                    index = len(outer.requests)
                    outer.requests.append(head + body)
                status, headers, payload = outer.script(index)
                lines = [
                    f"HTTP/1.1 {status} Whatever",
                    f"Content-Length: {len(payload)}",
                    "Content-Type: application/json",
                    "Connection: close",
                    *headers,
                ]
                self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # close() waits for serve_forever's next poll: 0.5 s by default
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def raw_http() -> Iterator[Callable[[Script], RawHTTP]]:
    started: list[RawHTTP] = []

    def make(script: Script) -> RawHTTP:
        server = RawHTTP(script)
        started.append(server)
        return server

    yield make
    for server in started:
        server.close()


def always(status: int, body: bytes, *headers: str) -> Script:
    return lambda _: (status, list(headers), body)


def run(tmp_path: Path, endpoint: str, count: int = 3, *extra: str) -> tuple[int, str, Path]:
    manifest = write_manifest(tmp_path / "m.jsonl", names(count))
    proc = run_worker(
        "run",
        str(manifest),
        "--endpoint",
        endpoint,
        "--max-attempts",
        "3",
        "--timeout",
        "5",
        *extra,
        env=cli_env(tmp_path),
    )
    return proc.returncode, proc.stderr, tmp_path / "m.ledger.jsonl"


def results(ledger: Path) -> list[dict[str, Any]]:
    if not ledger.exists():
        return []
    return [r for r in ledger_records(ledger) if r.get("type") == "result"]


def test_a_redirect_stops_the_run_and_the_target_gets_nothing(
    tmp_path: Path, raw_http: Callable[[Script], RawHTTP]
) -> None:
    """A 302 to another host: exit 7 (STOPPED), that host receives no request, nothing is
    recorded created, and the message names the redirect without its userinfo or token."""
    elsewhere = raw_http(always(200, envelope()))
    target = f"http://user:hunter2@127.0.0.1:{elsewhere.port}/x?X-Security-Token=STS-TOKEN"
    endpoint = raw_http(always(302, b"", f"Location: {target}"))
    code, stderr, ledger = run(tmp_path, endpoint.url)
    assert code == 7, stderr
    assert elsewhere.requests == []
    assert endpoint.requests  # it did ask the endpoint
    assert not [r for r in results(ledger) if r["outcome"] in ("created", "exists")]
    assert "never redirects" in stderr and f"127.0.0.1:{elsewhere.port}/x" in stderr
    assert "hunter2" not in stderr and "STS-TOKEN" not in stderr
    assert "hunter2" not in ledger.read_text() and "STS-TOKEN" not in ledger.read_text()


HOSTILE = (
    "\x1b[31mEVIL\x1b[0m \x1b]0;pwned-title\x07 first line\nsecond line\r\n"
    "\u202eesrever\u202c " + "x" * 900_000
)


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_server_text_is_cleaned_before_stderr_and_the_ledger(
    tmp_path: Path, raw_http: Callable[[Script], RawHTTP], log_format: str
) -> None:
    """A rejection whose message holds ANSI escapes, an OSC title, newlines, a bidi override
    and 900 KB reaches neither stderr nor the ledger raw: one clean line, bounded."""
    endpoint = raw_http(always(400, envelope("\x1b[1mInvalidParam\x1b[0m", HOSTILE)))
    code, stderr, ledger = run(tmp_path, endpoint.url, 2, "--log-format", log_format)
    assert code == 1, stderr
    for raw in (
        "\x1b[31m",
        "\x1b]0;",
        "pwned-title",
        "\u202e",
        "\\u001b",
        "\\u202e",
        "first line\nsecond",
    ):
        assert raw not in stderr
    rejected = results(ledger)
    assert [r["outcome"] for r in rejected] == ["rejected", "rejected"]
    for record in rejected:
        assert record["code"] == "InvalidParam"
        assert record["message"].startswith("EVIL first line second line esrever xxx")
        assert len(record["message"]) <= 300
    assert ledger.stat().st_size < 20_000  # not 900 KB per result


def test_an_unknown_5xx_code_is_retried_not_rejected(
    tmp_path: Path, raw_http: Callable[[Script], RawHTTP]
) -> None:
    """A proxy's 503 with a code nobody documented is retried; the retry's success is
    recorded created, and the run exits 0."""
    endpoint = raw_http(
        lambda i: (
            (503, ["Retry-After: 0"], envelope("ProxyBusy", "later"))
            if i == 0
            else (200, [], envelope())
        )
    )
    code, stderr, ledger = run(tmp_path, endpoint.url, 1)
    assert code == 0, stderr
    assert len(endpoint.requests) == 2
    assert [r["outcome"] for r in results(ledger)] == ["created"]


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (403, envelope("LackPolicy", "no policy")),
        (403, envelope("RequestForbidden.AccountIDNotAllow", "account not allowed")),
        (404, b"<html><body>404 Not Found</body></html>"),  # not the Live API at all
    ],
)
def test_an_account_level_refusal_stops_the_run_and_rejects_nothing(
    tmp_path: Path, raw_http: Callable[[Script], RawHTTP], status: int, body: bytes
) -> None:
    """A refusal every item would get stops the run (exit 7) and leaves the items pending,
    so that fixing the permission and rerunning sends them, rather than rejecting each."""
    endpoint = raw_http(always(status, body))
    code, stderr, ledger = run(tmp_path, endpoint.url, 5, "--concurrency", "1")
    assert code == 7, stderr
    assert not [r for r in results(ledger) if r["outcome"] == "rejected"]
    assert len(endpoint.requests) < 5  # it stopped; it did not try every item
