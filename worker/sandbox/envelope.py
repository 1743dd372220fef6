"""The bottom layer of the sandbox: the error every layer may answer with, and the documented
response envelopes (`ResponseMetadata` with a RequestId, `Error` on failure, `Result`)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson

from worker.api import spec


class ApiError(Exception):
    """Raised by the gateway or the service to answer with an error envelope; nothing has
    changed in the account when it is raised."""

    def __init__(self, status: int, code: str, message: str = "") -> None:
        super().__init__(f"{status} {code}: {message or code}")
        self.status, self.code, self.message = status, code, message or code


class Envelopes:
    """Builds answer bodies; RequestIds are unique per sandbox and start with the time, as
    the real ones do (`20230604110420` + hex)."""

    def __init__(self, now: Callable[[], datetime]) -> None:
        self._now = now
        self._ids = itertools.count(1)

    def ok(self, action: str, result: dict[str, Any] | None) -> bytes:
        body: dict[str, Any] = {"ResponseMetadata": self._metadata(action)}
        if result is not None:
            body["Result"] = result
        return orjson.dumps(body)

    def error(self, action: str, code: str, message: str) -> bytes:
        meta = self._metadata(action)
        meta["Error"] = {"Code": code, "Message": message}
        return orjson.dumps({"ResponseMetadata": meta})

    def _metadata(self, action: str) -> dict[str, Any]:
        return {
            "RequestId": f"{self._now():%Y%m%d%H%M%S}{next(self._ids):017X}",
            "Action": action,
            "Version": spec.VERSION,
            "Service": spec.SERVICE,
            "Region": spec.DEFAULT_REGION,
        }
