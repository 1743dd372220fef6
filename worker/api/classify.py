"""Classify step: what an answer means for the item. Pure and total.

Decided on `ResponseMetadata.Error.Code`, never on the HTTP status alone: 429 means both
"slow down" (FlowLimitExceeded) and "it is already there" (RequestLimitExceeded.Exist), and
CommonErr arrives with 200. The status decides only when the body carries no code, and for
the few statuses the Live API never gives (3xx, 401 without a known code).

    answer                                              verdict      the run
    2xx, no Error (or an empty Code)                    Succeeded    done (Result kept)
    RequestLimitExceeded.Exist                          Exists       done, for a create
    ResourceNotFound                                    NotFound     per action (runner)
    *FlowLimitExceeded*; 429 with another code or none  Throttled    pause, slow down, resend
    CommonErr, InternalError*, InternalServiceError*,   Retry        backoff, resend
      InternalServiceTimeout, ServiceUnavailableTemp,
      FailToConnect, UndefinedError; any 5xx, 408 or
      425 whose code is not a known terminal one;
      2xx/5xx without a readable envelope; no answer
    account-level codes (table below); any 3xx;         Abort        stop the run (exit 7)
      401; 4xx without an API envelope; an untrusted
      TLS certificate
    every other code (InvalidParam*, RequestForbidden,  Rejected     recorded, not resent
      MissingParameter, unknown codes on 2xx/4xx);
      413, 414, 431 without an envelope

Account-level or item-level: a code stops the run (Abort) when every further request would
get it too, whatever the item; it rejects the item when it is about this item's body.

    code                                  decision  why
    SignatureDoesNotMatch                 Abort     wrong secret key, or --region differs
    InvalidAccessKey                      Abort     the access key is unknown
    MissingAuthenticationToken,           Abort     no usable signature (a proxy may strip it)
      MissingSignature
    InvalidSecretToken                    Abort     STS token invalid or expired
    InvalidTimestamp                      Abort     the local clock is off
    AccessDenied, LackPolicy              Abort     the credentials lack the permission
    LackProjectPolicy                     Abort     no policy for a project; stopping leaves
                                                    items pending, rejecting would make every
                                                    line of that project a terminal outcome
    RequestForbidden.AccountIDNotAllow    Abort     the account may not use this API
    InvalidActionOrVersion,               Abort     the endpoint is not the Live API 2023-01-01
      ServiceNotFound, MethodNotAllowed
    MissingParameter                      Rejected  about this request's body
    RequestForbidden                      Rejected  "no such resource" for this group/project
    any other code with HTTP 401          Abort     authentication failed for every request

Stopping is the cautious side of every doubt: an Abort leaves items pending (the next run
sends them), a Rejected is a terminal outcome that reruns skip.

Server text is hostile until proven otherwise: codes, messages and request ids are cleaned of
control characters (ANSI escapes, C1, bidi overrides) and bounded once, when `Answer` is
built, so nothing downstream (logs, terminal, ledger) ever sees them raw.

docs/api.md restates these tables beside the documented meaning and source of each code.
"""

from __future__ import annotations

import math
import random
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import orjson

from worker.api import spec
from worker.api.transport import Failure, Response
from worker.settings import RetryPolicy

CODE_MAX = 64
MESSAGE_MAX = 300
REQUEST_ID_MAX = 128
DEFAULT_RETRY_AFTER_MAX_S = RetryPolicy().retry_after_max_s

EXISTS = spec.EXISTS
NOT_FOUND = spec.NOT_FOUND
RETRYABLE_CODES = frozenset(
    {
        "CommonErr",
        "InternalServiceTimeout",
        "ServiceUnavailableTemp",
        "FailToConnect",
        "UndefinedError",
    }
)
RETRYABLE_PREFIXES = ("InternalError", "InternalServiceError")
# Known terminal codes: on a 5xx these still decide (a 5xx with any other code is retried).
REJECT_CODES = frozenset({"MissingParameter", "RequestForbidden", NOT_FOUND, EXISTS})
REJECT_PREFIXES = ("InvalidParam",)
_PERMISSION = (
    "the credentials lack the permission for this action: grant it (IAM policy), then run again"
)
# Every request would fail the same way: stop the run, leave the rest pending.
ABORT_CODES = {
    "InvalidAccessKey": "the access key is not known to the account (or to this endpoint)",
    "MissingAuthenticationToken": "the request reached the server without a usable "
    "signature (does a proxy strip the Authorization header?)",
    "MissingSignature": "the request reached the server without a usable signature "
    "(does a proxy strip the Authorization header?)",
    "InvalidSecretToken": "the session token (VOLC_SESSION_TOKEN) is invalid or expired",
    "InvalidTimestamp": "the local clock differs too much from the server's: "
    "fix the local clock (NTP) and run again",
    "AccessDenied": _PERMISSION,
    "LackPolicy": _PERMISSION,
    "LackProjectPolicy": "the credentials lack a policy for a group's project (ProjectName): "
    "grant it, or leave that project's lines out",
    "RequestForbidden.AccountIDNotAllow": "the account is not allowed to use this API "
    "(is the Live service enabled for it?)",
    "InvalidActionOrVersion": "the endpoint does not know this Action/Version: is --endpoint "
    "the Live OpenAPI?",
    "ServiceNotFound": "the endpoint does not serve the 'live' service: check --endpoint "
    "and --region",
    "MethodNotAllowed": "the endpoint refuses POST: is --endpoint the Live OpenAPI?",
}
SIGNATURE = "SignatureDoesNotMatch"
REDIRECT_HINT = "the Live API never redirects: check --endpoint"
CERTIFICATE_HINT = (
    "the endpoint's TLS certificate is not trusted (a TLS-intercepting proxy, "
    "or the wrong host): check --endpoint and the system's CA certificates"
)
NON_API_HINT = (
    "it is not the Live OpenAPI, or a proxy in between refused the request: check --endpoint"
)


@dataclass(frozen=True, slots=True)
class Answer:
    """What the server said, as recorded in the ledger: cleaned and bounded on construction,
    so a hostile server cannot reach the terminal or bloat the ledger through it."""

    status: int | None
    code: str
    message: str
    request_id: str

    def __post_init__(self) -> None:
        # Normalised here rather than validated: this is the one place server text enters.
        object.__setattr__(self, "code", clean_code(self.code))
        object.__setattr__(self, "message", clean_text(self.message, MESSAGE_MAX))
        object.__setattr__(self, "request_id", clean_text(self.request_id, REQUEST_ID_MAX))


@dataclass(frozen=True, slots=True)
class Succeeded:
    answer: Answer
    # The envelope's `Result` when it is an object: List gives {"List": [...], "Total": n};
    # Create, Update and Delete give none.
    result: dict[str, Any] | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Exists:
    answer: Answer


@dataclass(frozen=True, slots=True)
class NotFound:
    answer: Answer


@dataclass(frozen=True, slots=True)
class Throttled:
    answer: Answer
    retry_after_s: float | None  # already clamped to the policy's ceiling


@dataclass(frozen=True, slots=True)
class Retry:
    answer: Answer
    retry_after_s: float | None  # already clamped to the policy's ceiling
    no_answer: bool = False  # no HTTP answer at all: see transport.Reachability


@dataclass(frozen=True, slots=True)
class Rejected:
    answer: Answer


@dataclass(frozen=True, slots=True)
class Abort:
    answer: Answer
    hint: str


Verdict = Succeeded | Exists | NotFound | Throttled | Retry | Rejected | Abort


def classify(
    result: Response | Failure,
    *,
    now: datetime | None = None,
    region: str | None = None,
    retry_after_max_s: float = DEFAULT_RETRY_AFTER_MAX_S,
) -> Verdict:
    """The verdict on one answer. `now` reads an HTTP-date Retry-After; `region` (the one the
    request was signed for) sharpens the hint of a signature mismatch; every Retry-After is
    clamped to [0, retry_after_max_s] here, once, for Throttled and Retry alike."""
    if isinstance(result, Failure):
        answer = Answer(None, _FAILURE_CODES[result.kind], result.detail, "")
        if result.kind == "certificate":
            return Abort(answer, CERTIFICATE_HINT)
        return Retry(answer, None, no_answer=result.no_answer)
    retry_after = (
        None  # the common case: no header, and no clock reading for it
        if result.retry_after is None
        else clamp_retry_after(
            parse_retry_after(result.retry_after, now or datetime.now(UTC)), retry_after_max_s
        )
    )
    status = result.status
    if 300 <= status < 400:
        # Checked before the body: whatever a redirect carries, it is not the API's answer.
        where = f" with a redirect to {result.location}" if result.location else ""
        message = f"the endpoint answered {status}{where}"
        return Abort(Answer(status, f"HTTP{status}", message, ""), REDIRECT_HINT)
    envelope = _envelope(result)
    if envelope is None:  # no readable envelope: only the status is left to go by
        answer = Answer(status, f"HTTP{status}", _snippet(result.body), "")
        return _without_envelope(status, answer, retry_after)
    code, message, request_id, payload = envelope
    answer = Answer(status, code, message, request_id)
    if not answer.code:  # decided on what is recorded (cleaned), not on what arrived
        if 200 <= status < 300:
            return Succeeded(answer, payload)
        return _without_envelope(status, _with_code(answer, f"HTTP{status}"), retry_after)
    return _by_code(answer, status, retry_after, region)


def _by_code(answer: Answer, status: int, retry_after: float | None, region: str | None) -> Verdict:
    """The envelope carries an error code: the code decides (the tables above), and the
    status only for a code we do not know."""
    code = answer.code
    if "FlowLimitExceeded" in code:
        return Throttled(answer, retry_after)
    if code == EXISTS:
        return Exists(answer)
    if code == NOT_FOUND:
        return NotFound(answer)
    if code in RETRYABLE_CODES or code.startswith(RETRYABLE_PREFIXES):
        return Retry(answer, retry_after)
    if code == SIGNATURE:
        return Abort(answer, _signature_hint(region))
    if code in ABORT_CODES:
        return Abort(answer, ABORT_CODES[code])
    if code in REJECT_CODES or code.startswith(REJECT_PREFIXES):
        return Rejected(answer)
    # A code we do not know: the status is the best guide to what it means.
    if status >= 500 or status in (408, 425):
        return Retry(answer, retry_after)  # a proxy's or a new transient code
    if status == 429:
        return Throttled(answer, retry_after)
    if status == 401:
        return Abort(
            answer,
            "the server refused the credentials: check VOLC_ACCESSKEY, "
            "VOLC_SECRETKEY (and VOLC_SESSION_TOKEN)",
        )
    return Rejected(answer)


def _without_envelope(status: int, answer: Answer, retry_after: float | None) -> Verdict:
    """No error code to go by: the status decides, cautiously."""
    if 200 <= status < 300:
        # A body we cannot read, or an Error we cannot read: it may or may not have been
        # done. Retrying is safe (an "already exists" answer confirms it); calling it done
        # is not.
        return Retry(_with_code(answer, "UnreadableBody"), retry_after)
    if status == 429:
        return Throttled(answer, retry_after)
    if status >= 500 or status in (408, 425):
        return Retry(answer, retry_after)
    if status in (413, 414, 431):
        return Rejected(answer)  # this item's request is too large; the next may not be
    # The Live API wraps every refusal in an envelope: a bare 4xx (or 1xx) comes from something
    # else (a web server, a WAF, a proxy) and would meet every request alike.
    return Abort(
        answer, f"the endpoint answered HTTP {status} without an API envelope: {NON_API_HINT}"
    )


def _signature_hint(region: str | None) -> str:
    where = f"--region {region}" if region else "the signing region (--region)"
    return (
        f"the secret key does not match the access key, or {where} is not the "
        "endpoint's region (the signature covers the region)"
    )


def _with_code(answer: Answer, code: str) -> Answer:
    return Answer(answer.status, code, answer.message, answer.request_id)


def _envelope(result: Response) -> tuple[str, str, str, dict[str, Any] | None] | None:
    """(code, message, request_id, Result) from a well-formed envelope, or None."""
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
    payload = body.get("Result")
    payload = payload if isinstance(payload, dict) else None
    error = meta.get("Error")
    if error is None:
        return "", "", request_id, payload
    if not isinstance(error, dict) or not isinstance(error.get("Code", ""), str):
        return None  # an Error we cannot read is not a success
    message = error.get("Message")
    message = message if isinstance(message, str) else ""
    return error.get("Code", ""), message, request_id, payload


def _snippet(body: bytes) -> str:
    return body[:MESSAGE_MAX].decode("utf-8", "replace")


# -- server text --------------------------------------------------------------------------

# ESC-introduced sequences (CSI such as colours and cursor moves, OSC such as window titles
# and hyperlinks, and two-byte escapes): removed whole, not just their ESC.
_ESCAPE_RE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]?|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?|\x9b[0-?]*[ -/]*[@-~]?"
)
_CODE_DROP_RE = re.compile(r"[^A-Za-z0-9._-]+")
_SCAN_MAX = 8 * MESSAGE_MAX  # more than enough input for a bounded output


def clean_text(text: str, limit: int) -> str:
    """Printable, single-line, at most `limit` characters (… marks a cut).

    Drops terminal escape sequences, control characters (C0, DEL, C1), format characters
    (bidi overrides and isolates, zero-width characters) and unpaired surrogates; turns every
    run of whitespace (line and paragraph separators included) into one space."""
    if (
        len(text) <= limit
        and text.isascii()
        and text.isprintable()
        and "  " not in text
        and text == text.strip()
    ):
        return text  # the common case (an id, a short English message): nothing to clean
    text = _ESCAPE_RE.sub("", text[:_SCAN_MAX])
    kept = [
        " " if ch.isspace() else ch
        for ch in text
        if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn")
    ]
    out = " ".join("".join(kept).split())
    return out if len(out) <= limit else out[: limit - 1] + "…"


def clean_code(code: str) -> str:
    """An error code as recorded: [A-Za-z0-9._-], at most CODE_MAX characters. Anything else
    becomes `_`, so a mangled code still cannot pass for a known one by accident."""
    return _CODE_DROP_RE.sub("_", _ESCAPE_RE.sub("", code[:_SCAN_MAX]).strip())[:CODE_MAX]


# -- Retry-After and backoff ----------------------------------------------------------------


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), or None when absent
    or unreadable. Not clamped: see clamp_retry_after."""
    if not value or len(value) > 64:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if not math.isnan(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - now).total_seconds()


def clamp_retry_after(seconds: float | None, ceiling: float) -> float | None:
    """The one clamp for every answer: [0, ceiling]; NaN is no value; ±inf are the bounds."""
    if seconds is None or math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), ceiling)


def backoff_s(
    attempt: int, policy: RetryPolicy, rng: random.Random, retry_after_s: float | None = None
) -> float:
    """Capped exponential backoff with full jitter after the `attempt`-th failure; a server's
    Retry-After (clamped by `classify`) is a floor, never ignored."""
    exponent = min(attempt - 1, 60)  # 2.0**1024 overflows; the cap is reached long before
    delay = rng.uniform(0, min(policy.max_delay_s, policy.initial_s * 2.0**exponent))
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    return delay


_FAILURE_CODES = {
    "dns": "DNSError",
    "refused": "ConnectionRefused",
    "connect": "ConnectionError",
    "tls": "TLSError",
    "certificate": "CertificateError",
    "timeout": "Timeout",
    "disconnected": "ConnectionLost",
    "protocol": "ProtocolError",
}
