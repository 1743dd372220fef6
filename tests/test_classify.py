"""Classification as one table: every answer the API documents, and the odd ones."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime

import orjson
import pytest

from worker.api.classify import (
    ABORT_CODES,
    CODE_MAX,
    MESSAGE_MAX,
    Abort,
    Answer,
    Exists,
    NotFound,
    Rejected,
    Retry,
    Succeeded,
    Throttled,
    backoff_s,
    clamp_retry_after,
    classify,
    clean_code,
    clean_text,
    parse_retry_after,
)
from worker.api.transport import Failure, Response
from worker.settings import RetryPolicy

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def envelope(
    status: int,
    code: object,
    *,
    retry_after: str | None = None,
    message: object = None,
    result: object = None,
) -> Response:
    meta: dict[str, object] = {"RequestId": "rid-1", "Action": "CreatePullToPushGroup"}
    if code is not None:
        meta["Error"] = {"Code": code, "Message": f"msg {code}" if message is None else message}
    body: dict[str, object] = {"ResponseMetadata": meta}
    if result is not None:
        body["Result"] = result
    return Response(status, orjson.dumps(body), retry_after)


TABLE = [
    (envelope(200, None), Succeeded),
    (envelope(200, ""), Succeeded),
    (envelope(200, None, result={"List": [], "Total": 0}), Succeeded),
    (envelope(429, "RequestLimitExceeded.Exist"), Exists),  # 429, meaning "it is there"
    (envelope(404, "ResourceNotFound"), NotFound),
    (envelope(429, "FlowLimitExceeded"), Throttled),  # 429, meaning "slow down"
    (envelope(429, "AccountFlowLimitExceeded"), Throttled),
    (envelope(429, "SomeNewLimit"), Throttled),  # unknown code on 429: slow down, not reject
    (envelope(200, "CommonErr"), Retry),  # an error with HTTP 200
    (envelope(500, "InternalError"), Retry),
    (envelope(500, "InternalError.DB"), Retry),
    (envelope(502, "InternalServiceError"), Retry),
    (envelope(502, "InternalServiceError.BadResponse"), Retry),
    (envelope(504, "InternalServiceTimeout"), Retry),
    (envelope(503, "ServiceUnavailableTemp"), Retry),
    (envelope(502, "FailToConnect"), Retry),
    (envelope(500, "UndefinedError"), Retry),
    # 5xx, 408 and 425 with a code we do not know: a proxy's, or a new transient one.
    (envelope(503, "ProxyOverloaded"), Retry),
    (envelope(504, "GatewayTimeout"), Retry),
    (envelope(500, "SomethingNobodyDocumented"), Retry),
    (envelope(408, "RequestTimeout"), Retry),
    (envelope(425, "TooEarly"), Retry),
    # ... but a known terminal code still decides on a 5xx.
    (envelope(500, "InvalidParam"), Rejected),
    (envelope(503, "AccessDenied"), Abort),
    # Account-level: every item would get it.
    (envelope(401, "SignatureDoesNotMatch"), Abort),
    (envelope(401, "InvalidAccessKey"), Abort),
    (envelope(401, "MissingAuthenticationToken"), Abort),
    (envelope(401, "MissingSignature"), Abort),
    (envelope(401, "InvalidSecretToken"), Abort),
    (envelope(401, "SomeNewAuthCode"), Abort),  # any 401: authentication failed for all
    (envelope(403, "AccessDenied"), Abort),
    (envelope(403, "LackPolicy"), Abort),
    (envelope(403, "LackProjectPolicy"), Abort),
    (envelope(403, "RequestForbidden.AccountIDNotAllow"), Abort),
    (envelope(400, "InvalidTimestamp"), Abort),
    (envelope(403, "InvalidTimestamp"), Abort),
    (envelope(400, "InvalidActionOrVersion"), Abort),
    (envelope(404, "ServiceNotFound"), Abort),
    (envelope(405, "MethodNotAllowed"), Abort),
    # Item-level: about this item's body or group.
    (envelope(400, "MissingParameter"), Rejected),
    (envelope(400, "InvalidParam"), Rejected),
    (envelope(400, "InvalidParam.BindError"), Rejected),
    (envelope(403, "RequestForbidden"), Rejected),
    (envelope(200, "SomethingNobodyDocumented"), Rejected),
    (envelope(400, "SomethingNobodyDocumented"), Rejected),
    (envelope(403, "RequestForbidden.SomethingNew"), Rejected),
    # No readable envelope: the status decides.
    (Response(500, b""), Retry),
    (Response(502, b"<html><body>502 Bad Gateway</body></html>"), Retry),
    (Response(503, b"not json"), Retry),
    (Response(504, b'{"ResponseMetadata": '), Retry),
    (Response(599, b""), Retry),
    (Response(408, b""), Retry),
    (Response(425, b""), Retry),
    (Response(200, b"<html>ok?</html>"), Retry),  # 2xx unreadable: maybe done, retry confirms
    (Response(204, b""), Retry),
    (Response(200, b'{"Result": {}}'), Retry),  # no ResponseMetadata
    (Response(200, orjson.dumps({"ResponseMetadata": {"Error": "boom"}})), Retry),
    (envelope(200, 7), Retry),  # 2xx with an Error whose Code is not a string
    (envelope(200, None, result=[1, 2]), Succeeded),  # a Result that is no object is no Result
    (Response(200, b"x" * 100, truncated=True), Retry),
    (Response(429, b""), Throttled),
    (Response(413, b"too large"), Rejected),  # this item's request is too large
    (Response(431, b""), Rejected),
    # A bare 4xx is not the Live API (which always sends an envelope): stop, leave items pending.
    (Response(400, orjson.dumps({"ResponseMetadata": {"Error": {"Code": 7}}})), Abort),
    (Response(404, b"<html>Not Found</html>"), Abort),
    (Response(418, b"teapot"), Abort),
    (Response(403, b"blocked by WAF"), Abort),
    (Response(401, b""), Abort),
    (Response(407, b""), Abort),
    (envelope(404, None), Abort),  # an envelope without an error on a 404
    (Response(101, b""), Abort),
    # What the network did.
    (Failure("dns", "not resolved"), Retry),
    (Failure("refused", "refused"), Retry),
    (Failure("connect", "unreachable"), Retry),
    (Failure("tls", "not TLS"), Retry),
    (Failure("timeout", "slow"), Retry),
    (Failure("timeout", "body slow", no_answer=False), Retry),
    (Failure("disconnected", "reset"), Retry),
    (Failure("protocol", "garbage"), Retry),
    (Failure("certificate", "untrusted"), Abort),
]


@pytest.mark.parametrize(("result", "kind"), TABLE)
def test_classification_table(result: Response | Failure, kind: type) -> None:
    """Each answer gets the class the API facts give it; the code is kept for the ledger."""
    verdict = classify(result, now=NOW)
    assert type(verdict) is kind
    if isinstance(result, Response) and result.status >= 400:
        assert verdict.answer.status == result.status
        assert verdict.answer.code  # raw or derived (HTTP418), never empty on an error


@pytest.mark.parametrize("status", [300, 301, 302, 303, 304, 305, 306, 307, 308, 399])
@pytest.mark.parametrize(
    "body", [b"", b"<html>moved</html>", orjson.dumps({"ResponseMetadata": {"RequestId": "r"}})]
)
def test_every_redirect_stops_the_run(status: int, body: bytes) -> None:
    """Any 3xx, whatever its body (even a success envelope), is a protocol error of the
    endpoint: Abort, naming the status and where it pointed."""
    result = Response(status, body, location="https://elsewhere.example/x")
    verdict = classify(result, now=NOW)
    assert isinstance(verdict, Abort)
    assert verdict.answer.code == f"HTTP{status}"
    assert verdict.answer.message == (
        f"the endpoint answered {status} with a redirect to https://elsewhere.example/x"
    )
    assert verdict.hint == "the Live API never redirects: check --endpoint"


def test_a_success_keeps_its_result() -> None:
    """A List's Result object reaches the verdict; Create's missing Result is None."""
    page = {"List": [{"Name": "A", "ProjectName": "default", "Tags": []}], "Total": 1}
    verdict = classify(envelope(200, None, result=page), now=NOW)
    assert isinstance(verdict, Succeeded) and verdict.result == page
    verdict = classify(envelope(200, None), now=NOW)
    assert isinstance(verdict, Succeeded) and verdict.result is None


def test_codes_and_request_ids_are_kept() -> None:
    """The verdict carries code, message and RequestId for the ledger."""
    verdict = classify(envelope(403, "RequestForbidden"), now=NOW)
    assert (verdict.answer.code, verdict.answer.message, verdict.answer.request_id) == (
        "RequestForbidden",
        "msg RequestForbidden",
        "rid-1",
    )
    assert classify(Response(502, b"<html>Bad</html>"), now=NOW).answer.code == "HTTP502"
    assert classify(Response(200, b"<html>"), now=NOW).answer.code == "UnreadableBody"


def test_failures_keep_their_cause() -> None:
    """A network failure's detail is the recorded message; its kind gives the code; no_answer
    survives into the verdict."""
    verdict = classify(Failure("dns", "the DNS name 'x.invalid' was not resolved"), now=NOW)
    assert isinstance(verdict, Retry) and verdict.no_answer
    assert verdict.answer == Answer(
        None, "DNSError", "the DNS name 'x.invalid' was not resolved", ""
    )
    late = classify(Failure("timeout", "body slow", no_answer=False), now=NOW)
    assert isinstance(late, Retry) and not late.no_answer
    assert classify(envelope(503, "X"), now=NOW) == Retry(
        Answer(503, "X", "msg X", "rid-1"), None, no_answer=False
    )


def test_hints_say_what_is_likely() -> None:
    """The signature hint names the region as a likely cause; the clock and permission hints
    name what to fix."""
    verdict = classify(envelope(401, "SignatureDoesNotMatch"), now=NOW, region="cn-beijing-9")
    assert isinstance(verdict, Abort)
    assert "--region cn-beijing-9" in verdict.hint and "secret key" in verdict.hint
    generic = classify(envelope(401, "SignatureDoesNotMatch"), now=NOW)
    assert isinstance(generic, Abort) and "--region" in generic.hint
    clock = classify(envelope(400, "InvalidTimestamp"), now=NOW)
    assert isinstance(clock, Abort) and "clock" in clock.hint
    denied = classify(envelope(403, "AccessDenied"), now=NOW)
    assert isinstance(denied, Abort) and "permission" in denied.hint
    assert all(hint and hint[0].islower() for hint in ABORT_CODES.values())


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("7", 7.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-5", 0.0),  # negative: now
        ("100000", 60.0),  # huge: the ceiling
        ("1e400", 60.0),  # inf
        ("-1e400", 0.0),
        ("nan", None),  # NaN is no value
        ("soon", None),
        ("", None),
        ("9" * 100, None),  # absurdly long: not parsed at all
        ("Thu, 01 Jan 2026 00:00:30 GMT", 30.0),
        ("Wed, 31 Dec 2025 23:00:00 GMT", 0.0),  # a date in the past
        ("Fri, 31 Dec 9999 23:59:59 GMT", 60.0),  # far future
        ("Thu, 01 Jan 2026 00:00:30", 30.0),  # no zone: UTC
        ("Thu, 99 Foo 2026 00:00:30 GMT", None),
    ],
)
def test_retry_after_is_read_and_clamped_once(header: str, seconds: float | None) -> None:
    """Seconds or HTTP date, clamped to [0, ceiling] in classify for Throttled and Retry
    alike; unreadable values are no value."""
    for result in (
        envelope(429, "FlowLimitExceeded", retry_after=header),
        envelope(503, "ServiceUnavailableTemp", retry_after=header),
        Response(429, b"", header),
        Response(502, b"", header),
    ):
        verdict = classify(result, now=NOW, retry_after_max_s=60.0)
        assert isinstance(verdict, Throttled | Retry)
        assert verdict.retry_after_s == seconds


def test_the_clamp_ceiling_comes_from_the_caller() -> None:
    """The policy's ceiling, passed in, is the one bound; the default is RetryPolicy's."""
    throttle = envelope(429, "FlowLimitExceeded", retry_after="120")
    verdict = classify(throttle, now=NOW, retry_after_max_s=5.0)
    assert isinstance(verdict, Throttled) and verdict.retry_after_s == 5.0
    verdict = classify(throttle, now=NOW)
    assert isinstance(verdict, Throttled)
    assert verdict.retry_after_s == RetryPolicy().retry_after_max_s
    assert parse_retry_after("-5", NOW) == -5.0  # parsing does not clamp; clamping does
    assert clamp_retry_after(math.inf, 10.0) == 10.0
    assert clamp_retry_after(math.nan, 10.0) is None
    assert clamp_retry_after(None, 10.0) is None


HOSTILE = [
    ("\x1b[31mred\x1b[0m text", "red text"),
    ("line1\nline2\r\nline3", "line1 line2 line3"),
    ("\x1b]0;pwned title\x07after", "after"),
    ("\x1b]8;;http://evil/\x1b\\link\x1b]8;;\x1b\\", "link"),
    ("tab\there", "tab here"),
    ("bell\x07 nul\x00 del\x7f c1\x85x\x9b31m", "bell nul del c1 x"),
    ("\u202eevil\u202c \u2066iso\u2069 \u200bzw", "evil iso zw"),
    ("para\u2029sep\u2028line", "para sep line"),
    ("中文消息 ok", "中文消息 ok"),
    ("   ", ""),
]


@pytest.mark.parametrize(("raw", "clean"), HOSTILE)
def test_server_text_is_cleaned(raw: str, clean: str) -> None:
    """Escapes, controls, bidi and zero-width characters go; whitespace collapses to one line."""
    verdict = classify(envelope(400, "InvalidParam", message=raw), now=NOW)
    assert verdict.answer.message == clean
    assert clean_text(raw, 300) == clean


def test_lone_surrogates_are_dropped() -> None:
    """Text that is not valid Unicode (a lone surrogate) cannot reach the ledger's UTF-8."""
    assert clean_text("\ud800lone surrogate", 300) == "lone surrogate"


def test_server_text_is_bounded() -> None:
    """A 900 KB message is stored as at most MESSAGE_MAX characters, marked as cut; a huge
    code as at most CODE_MAX; an unreadable body's snippet too."""
    verdict = classify(envelope(400, "InvalidParam", message="x" * 900_000), now=NOW)
    assert len(verdict.answer.message) == MESSAGE_MAX and verdict.answer.message.endswith("…")
    verdict = classify(envelope(400, "A" * 10_000), now=NOW)
    assert len(verdict.answer.code) == CODE_MAX
    verdict = classify(Response(502, b"\x1b[2J" + b"y" * 100_000), now=NOW)
    assert len(verdict.answer.message) <= MESSAGE_MAX and "\x1b" not in verdict.answer.message
    rid = orjson.dumps({"ResponseMetadata": {"RequestId": "r\n" * 1000}})
    assert len(classify(Response(200, rid), now=NOW).answer.request_id) <= 128


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("InvalidParam", "InvalidParam"),
        ("\x1b[31mInvalidParam\x1b[0m", "InvalidParam"),
        (" FlowLimitExceeded\n", "FlowLimitExceeded"),
        ("Bad Code/with:stuff", "Bad_Code_with_stuff"),
        ("代码", "_"),
    ],
)
def test_codes_are_restricted(raw: str, clean: str) -> None:
    """Codes keep only [A-Za-z0-9._-]; an escape around a known code does not hide it."""
    assert clean_code(raw) == clean


def test_classification_decides_on_the_cleaned_code() -> None:
    """An ANSI-wrapped throttle code is still a throttle, and is recorded clean."""
    verdict = classify(envelope(429, "\x1b[1mFlowLimitExceeded\x1b[0m"), now=NOW)
    assert isinstance(verdict, Throttled) and verdict.answer.code == "FlowLimitExceeded"


def test_backoff_is_capped_full_jitter() -> None:
    """Delays lie in [0, min(max, initial*2^(n-1))], and a (clamped) Retry-After is a floor."""
    policy = RetryPolicy(initial_s=0.5, max_delay_s=8.0, retry_after_max_s=20.0)
    rng = random.Random(0)
    for attempt in range(1, 2000, 7):
        cap = min(8.0, 0.5 * 2 ** min(attempt - 1, 60))
        assert 0 <= backoff_s(attempt, policy, rng) <= cap
    assert backoff_s(1, policy, rng, retry_after_s=5.0) >= 5.0
    spread = {round(backoff_s(6, policy, random.Random(seed)), 3) for seed in range(50)}
    assert len(spread) > 40  # jitter: not the same delay for everybody
