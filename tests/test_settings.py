"""Settings: every number a user can give is finite and in its documented range, every URL is
checked and printed only redacted, and loopback means a loopback address."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from worker.errors import UsageError
from worker.settings import DEFAULT_CAP, LIMITS, Pacing, RetryPolicy, Settings
from worker.urls import (
    UNPARSABLE_URL,
    check_endpoint,
    check_limiter,
    is_loopback,
    redact_url,
    secret_in_url,
)

M, L = Path("m.jsonl"), Path("m.ledger.jsonl")


def settings(**kw: Any) -> Settings:
    return Settings(manifest=M, ledger=L, **kw)


# Each flag, how to build it, and values on both sides of its documented range.
FLAGS: dict[str, tuple[Any, list[Any], list[Any]]] = {
    "rate": (lambda v: Pacing(rate=v), [0.2, 10, 10_000], [0, 0.19, 1e-300, -1, 10_000.5, 10**30]),
    "headroom": (lambda v: Pacing(headroom=v), [0, 0.03, 0.49], [0.5, -0.1, 1]),
    "concurrency": (lambda v: settings(concurrency=v), [1, 1000], [0, -1, 1001, 100_000]),
    "max-attempts": (lambda v: RetryPolicy(max_attempts=v), [1, 100], [0, 101, 10**20]),
    "item-deadline": (lambda v: RetryPolicy(item_deadline_s=v), [0.1, 86_400], [0, 86_401]),
    "timeout": (lambda v: settings(timeout_s=v), [0.01, 600], [0, -5, 600.5]),
    "grace": (lambda v: settings(grace_s=v), [0, 0.0, 3600], [-1, 3601]),
    "limiter-timeout": (lambda v: settings(limiter_timeout_s=v), [1, 86_400], [0, 86_401]),
    "max-delete": (lambda v: LIMITS["max-delete"].check(v), [0, 50, 1_000_000], [-1, 1_000_001]),
    "metrics-port": (lambda v: LIMITS["metrics-port"].check(v), [0, 9108, 65535], [-1, 65536]),
    "metrics-push-interval": (
        lambda v: LIMITS["metrics-push-interval"].check(v),
        [1, 15, 3600],
        [0, 0.5, 3601],
    ),
}
NOT_FINITE = [float("nan"), float("inf"), float("-inf"), -0.0]


def test_every_flag_has_a_limit() -> None:
    """The table of tests covers exactly the documented limits."""
    assert set(FLAGS) == set(LIMITS)


@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_values_in_range_are_accepted(flag: str) -> None:
    """Values inside the documented range (edges included where the range includes them)."""
    build, good, _ = FLAGS[flag]
    for value in good:
        build(value)


@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_values_out_of_range_name_the_flag_and_the_range(flag: str) -> None:
    """Out of range, NaN, infinities, -0.0 and huge ints: a UsageError naming the flag and its
    range, never a traceback or a silent default."""
    build, _, bad = FLAGS[flag]
    limit = LIMITS[flag]
    candidates = bad + ([] if limit.whole else NOT_FINITE)
    for value in candidates:
        with pytest.raises(UsageError) as info:
            build(value)
        message = str(info.value)
        assert message.startswith(f"--{flag} must be ") and f" in {limit}, not " in message
        assert len(message) < 120


def test_whole_number_flags_refuse_floats_and_booleans() -> None:
    """A count is an int: 8.0, 1.5 and True (a TOML boolean) are refused."""
    for value in (8.0, 1.5, True):
        with pytest.raises(UsageError, match="--max-attempts must be a"):
            RetryPolicy(max_attempts=value)  # type: ignore[arg-type]


def test_range_text_is_what_the_help_says() -> None:
    """The ranges print the way docs/configuration.md documents them."""
    assert [str(LIMITS[f]) for f in ("rate", "concurrency", "timeout", "grace", "headroom")] == [
        "[0.2, 10000]",
        "1..1000",
        "(0, 600]",
        "[0, 3600]",
        "[0, 0.5)",
    ]


def test_concurrency_none_means_the_default_and_zero_is_an_error() -> None:
    """None asks for the default; 0 no longer silently means it."""
    assert settings().concurrency is None
    # The header records what the runner uses: adaptive up to its cap, not a made-up 25.
    assert settings().public()["concurrency"] == f"adaptive, cap {DEFAULT_CAP}"
    assert settings(concurrency=7).public()["concurrency"] == 7
    with pytest.raises(UsageError, match="--concurrency"):
        settings(concurrency=0)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user:pw@host:8080/p?q=1", "https://user:***@host:8080/p?q=1"),
        ("https://token@host", "https://***@host"),
        ("redis://:hunter2@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://u:p%40ss@h/0", "rediss://u:***@h/0"),
        ("redis://h/0?password=hunter2&db=1", "redis://h/0?password=***&db=1"),
        ("unix:///run/redis.sock?PassWord=x&db=0", "unix:///run/redis.sock?PassWord=***&db=0"),
        (
            "https://h/?X-Amz-Signature=abc&access_key=AK&sk=S&Auth=1&keep=1",
            "https://h/?X-Amz-Signature=***&access_key=***&sk=***&Auth=***&keep=1",
        ),
        ("https://h/#access_token=abc", "https://h/#access_token=***"),
        ("https://h/?api-key=abc&secretKey=1", "https://h/?api-key=***&secretKey=***"),
        ("https://live.volcengineapi.com", "https://live.volcengineapi.com"),
        # path parameters (RFC 3986 `;name=value`) are parameters too
        ("https://h/;password=hunter2", "https://h/;password=***"),
        ("https://h/x;token=t1;a=b/y;Secret=z?a=b", "https://h/x;token=***;a=b/y;Secret=***?a=b"),
        ("https://h/a;b/c", "https://h/a;b/c"),
        ("https://h/?q=\x1b[31m", "https://h/?q=\\x1b[31m"),
        ("user:pw@host", UNPARSABLE_URL),
        ("http://[::1", UNPARSABLE_URL),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    """Userinfo passwords, bare userinfo tokens and password-like parameters become ***;
    terminal escapes are escaped; what cannot be parsed is a placeholder."""
    assert redact_url(url) == expected


def test_redact_url_never_raises_on_garbage() -> None:
    """Thousands of random strings built from URL syntax: never an exception, never a
    control character out."""
    rng = random.Random(0)
    alphabet = [*"ab:/@?#&=[]%.:0129 \t\x00\x1b\u4e00\ud800", "http://", "[::1]", "%zz"]
    for _ in range(5000):
        url = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        out = redact_url(url)
        assert isinstance(out, str) and out.isprintable()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LOCALHOST", True),
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("127.example.com", False),
        ("127.0.0.1.nip.io", False),
        ("localhost.example.com", False),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
        ("::", False),
        ("", False),
    ],
)
def test_loopback_is_decided_on_the_address(host: str, loopback: bool) -> None:
    """Loopback is localhost or a literal in 127.0.0.0/8 or ::1, never a name's prefix."""
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://live.volcengineapi.com",
        "https://live.volcengineapi.com:443/",
        "http://127.0.0.1:8080",
        "http://localhost:1",
        "http://[::1]:8080",
    ],
)
def test_good_endpoints(endpoint: str) -> None:
    """https anywhere; plain http to loopback."""
    check_endpoint(endpoint)


@pytest.mark.parametrize(
    ("endpoint", "reason"),
    [
        ("http://127.example.com", "plain http is allowed only to loopback"),
        ("http://10.0.0.1:80", "plain http is allowed only to loopback"),
        ("https://admin:s3cret@live.volcengineapi.com", "remove the user:password@ part"),
        ("https://tok3n@live.volcengineapi.com", "remove the user:password@ part"),
        ("https://h/path", "give only scheme, host and port"),
        ("https://h/?password=s3cret", "give only scheme, host and port"),
        ("https://h:99999", "not a URL"),
        ("https://h:0", "port 0"),
        ("ftp://h", "expected http(s)://HOST[:PORT]"),
        ("live.volcengineapi.com", "expected http(s)://HOST[:PORT]"),
        ("https://h\x1b[31m", "control characters"),
        ("http://[::1", "not a URL"),
    ],
)
def test_bad_endpoints_are_refused_showing_only_the_redacted_url(
    endpoint: str, reason: str
) -> None:
    """A bad --endpoint is a UsageError with the reason; a secret in it never reaches the
    message, nor does a raw control character."""
    with pytest.raises(UsageError) as info:
        settings(endpoint=endpoint)
    message = str(info.value)
    assert message.startswith("--endpoint ") and reason in message
    assert "s3cret" not in message and "tok3n" not in message and "\x1b" not in message


def test_limiter_url_errors_and_the_ledger_header_are_redacted() -> None:
    """A wrong --limiter scheme is refused without its password; public() (the ledger header)
    holds no password either."""
    with pytest.raises(UsageError) as info:
        settings(limiter_url="http://:hunter2@redis:6379")
    assert "hunter2" not in str(info.value) and "expected redis://" in str(info.value)
    public = settings(limiter_url="redis://:hunter2@redis:6379/0?password=hunter2").public()
    assert "hunter2" not in repr(public)
    assert public["limiter"] == "redis://:***@redis:6379/0?password=***"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redis://h:99999/3", "1..65535"),
        ("redis://h:0/3", "port 0"),
        ("redis://h/3?socket_timeout=abc", "socket_timeout must be"),
        ("redis://h/3?socket_timeout=inf", "socket_timeout must be"),
        ("redis://h/3?sockettimeout=1", "unknown parameter"),
        ("redis://h/12?db=3", "name different databases"),
        ("redis://h/3?db=3&db=3", "given twice"),
        ("redis://h/x", "database number alone"),
        ("redis://h/3;password=pw", "database number alone"),
        ("redis://h/3#frag", "fragment"),
        ("redis://h/3#", "fragment"),
        ("unix://", "unix:///path"),
        ("http://h/3", "expected redis://"),
    ],
)
def test_bad_limiter_urls_are_refused(url: str, why: str) -> None:
    """Each --limiter redis-py would misread (or read only at the first connect) is refused."""
    with pytest.raises(UsageError, match="--limiter") as info:
        check_limiter(url)
    assert why in str(info.value) and "pw" not in str(info.value).replace("password", "")


@pytest.mark.parametrize(
    "url", ["redis://h:6379/3", "redis://:pw@h/3?db=3", "unix:///r.sock?db=2", "rediss://h"]
)
def test_good_limiter_urls_pass(url: str) -> None:
    """Plain Redis URLs, with a matching ?db= or a password, pass."""
    check_limiter(url)


def test_secret_in_url_names_the_part_never_the_value() -> None:
    """Userinfo, ?password=, ;token= and #access_token= are credentials; ?db= is not."""
    assert secret_in_url("redis://:hunter2@h/3") == "its user:password@ part"
    assert secret_in_url("redis://h/3?password=hunter2") == "its password parameter"
    assert secret_in_url("redis://h/3;token=x") == "its token parameter"
    assert secret_in_url("https://h/#access_token=x") == "its access_token parameter"
    assert secret_in_url("redis://h/3?db=3") is None


def test_fragments_are_redacted_whole() -> None:
    """A fragment is never sent: all of it is ***, named parameters keep their names."""
    assert redact_url("redis://h/3#hunter2") == "redis://h/3#***"
    assert redact_url("http://h#a=b&c") == "http://h#a=***&***"
