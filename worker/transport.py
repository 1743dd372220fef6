"""Send step: the only module that imports the HTTP client.

`send` never raises for anything the network or the server does: it returns a `Response`
(whatever the status and body) or a `Failure` (what went wrong, and whether the request may
have reached the server). aiohttp's exceptions are mapped here, once, most specific first:
certificate errors are ClientConnectorError subclasses and ServerTimeoutError is also a
TimeoutError, so the order of the checks matters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

import aiohttp

MAX_BODY_BYTES = 1 << 20  # an API envelope is a few hundred bytes; never buffer a flood

FailureKind = Literal["connect", "tls", "timeout", "disconnected", "protocol"]


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = field(repr=False)
    retry_after: str | None = None
    truncated: bool = False  # the body was longer than MAX_BODY_BYTES


@dataclass(frozen=True, slots=True)
class Failure:
    kind: FailureKind
    detail: str

    @property
    def maybe_delivered(self) -> bool:
        """A refused connection carried nothing; anything later may have been acted on."""
        return self.kind not in ("connect", "tls")


class Transport:
    """One connection pool to one endpoint, opened and closed by `async with`."""

    def __init__(self, endpoint: str, *, timeout_s: float, max_connections: int) -> None:
        self._endpoint = endpoint.rstrip("/") + "/"
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(10.0, timeout_s))
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"<Transport {self._endpoint} open={self._session is not None}>"

    async def __aenter__(self) -> Transport:
        connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, auto_decompress=True,
            skip_auto_headers=("User-Agent",), headers={"User-Agent": "worker-bulk/0.1"},
        )
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, query: Mapping[str, str], headers: Mapping[str, str],
                   body: bytes) -> Response | Failure:
        """POST exactly these bytes with exactly these (already signed) headers."""
        assert self._session is not None, "use `async with Transport(...)`"
        try:
            async with self._session.post(self._endpoint, params=dict(query),
                                          headers=dict(headers), data=body) as resp:
                data = bytearray()
                truncated = False
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    data += chunk
                    if len(data) > MAX_BODY_BYTES:
                        truncated = True
                        break
                return Response(status=resp.status, body=bytes(data[:MAX_BODY_BYTES]),
                                retry_after=resp.headers.get("Retry-After"),
                                truncated=truncated)
        except aiohttp.ClientConnectorCertificateError as exc:
            return Failure("tls", f"certificate: {exc.certificate_error}")
        except aiohttp.ClientSSLError as exc:
            return Failure("tls", str(exc))
        except aiohttp.ClientConnectorError as exc:
            return Failure("connect", f"cannot connect: {exc.strerror or exc}")
        except (TimeoutError, aiohttp.ServerTimeoutError):
            return Failure("timeout", "no answer in time")
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                aiohttp.ClientPayloadError) as exc:
            return Failure("disconnected", f"connection lost: {type(exc).__name__}")
        except aiohttp.ClientResponseError as exc:
            return Failure("protocol", f"bad HTTP answer: {exc.message}")
        except aiohttp.ClientError as exc:
            return Failure("protocol", f"{type(exc).__name__}: {exc}")
