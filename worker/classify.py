"""Classify step: what an answer means for the item. Pure and total.

Decided on `ResponseMetadata.Error.Code`, never on the HTTP status alone: 429 means both
"slow down" (FlowLimitExceeded) and "it is already there" (RequestLimitExceeded.Exist), and
CommonErr arrives with 200. The status decides only when the body carries no code.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import orjson

from worker.settings import RetryPolicy
from worker.transport import Failure, Response

RETRYABLE_CODES = frozenset({
    "CommonErr", "InternalServiceTimeout", "ServiceUnavailableTemp", "FailToConnect",
    "UndefinedError",
})
RETRYABLE_PREFIXES = ("InternalError", "InternalServiceError")
# Every request would fail the same way: stop the run, leave the rest pending.
ABORT_CODES = {
    "SignatureDoesNotMatch": "the secret key does not match the access key, or the request "
                             "was changed on its way",
    "InvalidAccessKey": "the access key is not known to the account",
    "MissingAuthenticationToken": "the request carried no usable signature",
    "MissingSignature": "the request carried no usable signature",
    "InvalidSecretToken": "the session token (VOLC_SESSION_TOKEN) is invalid or expired",
    "AccessDenied": "the credentials are not allowed to create pull-to-push groups",
    "InvalidTimestamp": "the local clock differs too much from the server's: "
                        "fix the local clock (NTP) and run again",
}
EXISTS = "RequestLimitExceeded.Exist"


@dataclass(frozen=True, slots=True)
class Answer:
    """What the server said, as recorded in the ledger."""

    status: int | None
    code: str
    message: str
    request_id: str


@dataclass(frozen=True, slots=True)
class Created:
    answer: Answer


@dataclass(frozen=True, slots=True)
class Exists:
    answer: Answer


@dataclass(frozen=True, slots=True)
class Throttled:
    answer: Answer
    retry_after_s: float | None


@dataclass(frozen=True, slots=True)
class Retry:
    answer: Answer
    retry_after_s: float | None


@dataclass(frozen=True, slots=True)
class Rejected:
    answer: Answer


@dataclass(frozen=True, slots=True)
class Abort:
    answer: Answer
    hint: str


Verdict = Created | Exists | Throttled | Retry | Rejected | Abort


def classify(result: Response | Failure, *, now: datetime | None = None) -> Verdict:
    if isinstance(result, Failure):
        answer = Answer(None, _FAILURE_CODES[result.kind], result.detail, "")
        if result.kind == "tls":
            return Abort(answer, "the endpoint's TLS certificate is not trusted")
        return Retry(answer, None)
    meta = _metadata(result)
    retry_after = parse_retry_after(result.retry_after, now or datetime.now(UTC))
    if meta is None:  # no readable envelope: only the status is left to go by
        answer = Answer(result.status, "", _snippet(result.body), "")
        return _by_status(result.status, answer, retry_after, readable=False)
    code, message, request_id = meta
    answer = Answer(result.status, code, message, request_id)
    if not code:
        return _by_status(result.status, answer, retry_after, readable=True)
    if "FlowLimitExceeded" in code:
        return Throttled(answer, retry_after)
    if code == EXISTS:
        return Exists(answer)
    if code in RETRYABLE_CODES or code.startswith(RETRYABLE_PREFIXES):
        return Retry(answer, retry_after)
    if code in ABORT_CODES:
        return Abort(answer, ABORT_CODES[code])
    return Rejected(answer)


def _by_status(status: int, answer: Answer, retry_after: float | None, *,
               readable: bool) -> Verdict:
    """For answers without an error code: the status is all there is to go by."""
    if 200 <= status < 300:
        if readable:
            return Created(answer)
        # 2xx without a readable envelope: it may or may not have been done. Retrying is
        # safe (an "already exists" answer confirms it); calling it created is not.
        return Retry(_with_code(answer, "UnreadableBody"), retry_after)
    if status == 429:
        return Throttled(_with_code(answer, f"HTTP{status}"), retry_after)
    if status >= 500 or status == 408:
        return Retry(_with_code(answer, f"HTTP{status}"), retry_after)
    return Rejected(_with_code(answer, f"HTTP{status}"))


def _with_code(answer: Answer, code: str) -> Answer:
    return Answer(answer.status, answer.code or code, answer.message, answer.request_id)


def _metadata(result: Response) -> tuple[str, str, str] | None:
    """(code, message, request_id) from a well-formed envelope, or None."""
    if result.truncated:
        return None
    try:
        body: Any = orjson.loads(result.body)
    except orjson.JSONDecodeError:
        return None
    meta = body.get("ResponseMetadata") if isinstance(body, dict) else None
    if not isinstance(meta, dict):
        return None
    request_id = meta.get("RequestId")
    request_id = request_id if isinstance(request_id, str) else ""
    error = meta.get("Error")
    if error is None:
        return "", "", request_id
    if not isinstance(error, dict) or not isinstance(error.get("Code", ""), str):
        return None  # an Error we cannot read is not a success
    message = error.get("Message")
    return error.get("Code", ""), message if isinstance(message, str) else "", request_id


def _snippet(body: bytes) -> str:
    text = body[:200].decode("utf-8", "replace")
    return " ".join(text.split())


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def backoff_s(attempt: int, policy: RetryPolicy, rng: random.Random,
              retry_after_s: float | None = None) -> float:
    """Capped exponential backoff with full jitter after the `attempt`-th failure; a server's
    Retry-After (clamped to the policy's ceiling) is a floor, never ignored."""
    exponent = min(attempt - 1, 60)  # 2.0**1024 overflows; the cap is reached long before
    delay = rng.uniform(0, min(policy.max_delay_s, policy.initial_s * 2.0 ** exponent))
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, policy.retry_after_max_s))
    return delay


_FAILURE_CODES = {"connect": "ConnectionError", "tls": "TLSError", "timeout": "Timeout",
                  "disconnected": "ConnectionLost", "protocol": "ProtocolError"}
