"""Classification as one table: every answer the API documents, and the odd ones."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import orjson
import pytest

from worker.classify import (
    Abort,
    Created,
    Exists,
    Rejected,
    Retry,
    Throttled,
    backoff_s,
    classify,
    parse_retry_after,
)
from worker.settings import RetryPolicy
from worker.transport import Failure, Response

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def envelope(status: int, code: str | None, *, retry_after: str | None = None) -> Response:
    meta: dict[str, object] = {"RequestId": "rid-1", "Action": "CreatePullToPushGroup"}
    if code is not None:
        meta["Error"] = {"Code": code, "Message": f"msg {code}"}
    return Response(status, orjson.dumps({"ResponseMetadata": meta}), retry_after)


TABLE = [
    (envelope(200, None), Created),
    (envelope(200, ""), Created),
    (envelope(429, "RequestLimitExceeded.Exist"), Exists),  # 429, meaning "it is there"
    (envelope(429, "FlowLimitExceeded"), Throttled),  # 429, meaning "slow down"
    (envelope(429, "AccountFlowLimitExceeded"), Throttled),
    (envelope(200, "CommonErr"), Retry),  # an error with HTTP 200
    (envelope(500, "InternalError"), Retry),
    (envelope(500, "InternalError.DB"), Retry),
    (envelope(502, "InternalServiceError"), Retry),
    (envelope(502, "InternalServiceError.BadResponse"), Retry),
    (envelope(504, "InternalServiceTimeout"), Retry),
    (envelope(503, "ServiceUnavailableTemp"), Retry),
    (envelope(502, "FailToConnect"), Retry),
    (envelope(500, "UndefinedError"), Retry),
    (envelope(401, "SignatureDoesNotMatch"), Abort),
    (envelope(401, "InvalidAccessKey"), Abort),
    (envelope(401, "MissingAuthenticationToken"), Abort),
    (envelope(401, "InvalidSecretToken"), Abort),
    (envelope(403, "AccessDenied"), Abort),
    (envelope(400, "InvalidTimestamp"), Abort),
    (envelope(400, "InvalidParam"), Rejected),
    (envelope(400, "InvalidParam.BindError"), Rejected),
    (envelope(403, "RequestForbidden"), Rejected),
    (envelope(403, "RequestForbidden.AccountIDNotAllow"), Rejected),
    (envelope(404, "ResourceNotFound"), Rejected),
    (envelope(200, "SomethingNobodyDocumented"), Rejected),
    (Response(500, b""), Retry),
    (Response(502, b"<html><body>502 Bad Gateway</body></html>"), Retry),
    (Response(503, b"not json"), Retry),
    (Response(504, b'{"ResponseMetadata": '), Retry),
    (Response(200, b"<html>ok?</html>"), Retry),  # 2xx unreadable: maybe done, retry confirms
    (Response(200, b'{"Result": {}}'), Retry),  # no ResponseMetadata
    (Response(200, orjson.dumps({"ResponseMetadata": {"Error": "boom"}})), Retry),
    (Response(400, orjson.dumps({"ResponseMetadata": {"Error": {"Code": 7}}})), Rejected),
    (Response(200, b"x" * 100, truncated=True), Retry),
    (Response(429, b""), Throttled),
    (Response(418, b"teapot"), Rejected),
    (Failure("connect", "refused"), Retry),
    (Failure("timeout", "slow"), Retry),
    (Failure("disconnected", "reset"), Retry),
    (Failure("protocol", "garbage"), Retry),
    (Failure("tls", "untrusted"), Abort),
]


@pytest.mark.parametrize(("result", "kind"), TABLE)
def test_classification_table(result: Response | Failure, kind: type) -> None:
    """Each answer gets the class the API facts give it; the code is kept for the ledger."""
    verdict = classify(result, now=NOW)
    assert type(verdict) is kind
    if isinstance(result, Response) and result.status >= 400:
        assert verdict.answer.status == result.status
        assert verdict.answer.code  # raw or derived (HTTP418), never empty on an error


def test_codes_and_request_ids_are_kept() -> None:
    """The verdict carries code, message and RequestId for the ledger."""
    verdict = classify(envelope(403, "RequestForbidden"), now=NOW)
    assert (verdict.answer.code, verdict.answer.message, verdict.answer.request_id) == \
        ("RequestForbidden", "msg RequestForbidden", "rid-1")
    assert classify(Response(502, b"<html>Bad</html>"), now=NOW).answer.code == "HTTP502"


def test_invalid_timestamp_names_the_clock() -> None:
    """InvalidTimestamp stops the run with a hint about the local clock."""
    verdict = classify(envelope(400, "InvalidTimestamp"), now=NOW)
    assert isinstance(verdict, Abort) and "clock" in verdict.hint


def test_retry_after_is_read() -> None:
    """Retry-After in seconds or as an HTTP date reaches the verdict."""
    verdict = classify(envelope(503, "ServiceUnavailableTemp", retry_after="7"), now=NOW)
    assert isinstance(verdict, Retry) and verdict.retry_after_s == 7.0
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", NOW) == 30.0
    assert parse_retry_after("soon", NOW) is None
    assert parse_retry_after("-5", NOW) == 0.0


def test_backoff_is_capped_full_jitter() -> None:
    """Delays lie in [0, min(max, initial*2^(n-1))], and Retry-After is a clamped floor."""
    policy = RetryPolicy(initial_s=0.5, max_delay_s=8.0, retry_after_max_s=20.0)
    rng = random.Random(0)
    for attempt in range(1, 2000, 7):
        cap = min(8.0, 0.5 * 2 ** min(attempt - 1, 60))
        assert 0 <= backoff_s(attempt, policy, rng) <= cap
    assert backoff_s(1, policy, rng, retry_after_s=5.0) >= 5.0
    assert backoff_s(1, policy, rng, retry_after_s=500.0) == 20.0
    spread = {round(backoff_s(6, policy, random.Random(seed)), 3) for seed in range(50)}
    assert len(spread) > 40  # jitter: not the same delay for everybody
