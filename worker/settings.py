"""Settings: frozen values built once by the CLI and passed down explicitly.

Every number a user can give is checked here, once, against the range in LIMITS (finite, in
range, the right kind): a UsageError names the flag, the range and the value. URLs are
checked here too (`check_endpoint`, `check_limiter`), and `redact_url` is the one way a URL
reaches a message, a log line or the ledger.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar
from urllib.parse import SplitResult, parse_qsl, unquote_plus, urlsplit

from worker.api import spec
from worker.errors import UsageError

# Pace a little under the limit. The server stamps arrivals, not our sends: a few ms of
# jitter between the two must not push an 11th request into someone's sliding second.
DEFAULT_HEADROOM = 0.03
# Without --concurrency the runner adapts the requests in flight to the latency it measures,
# up to this cap (runner/concurrency.machine_cap also keeps it under the open-file limit).
DEFAULT_CAP: Final = 512

N = TypeVar("N", int, float)
MIN_RATE_FLAG: Final = 0.2  # the lowest --rate: see LIMITS


@dataclass(frozen=True, slots=True, kw_only=True)
class Limit:
    """The documented range of one numeric option."""

    flag: str
    low: float
    high: float
    low_open: bool = False  # (low, ...: low itself is refused
    high_open: bool = False  # ..., high): high itself is refused
    whole: bool = False  # an int is required

    def __str__(self) -> str:
        low = f"{self.low:g}" if not self.whole else str(int(self.low))
        high = f"{self.high:g}" if not self.whole else str(int(self.high))
        if self.whole:
            return f"{low}..{high}"
        return f"{'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"

    def check(self, value: N, named: str = "") -> N:
        """`value` when it is a finite number in range, else a UsageError naming where the
        value came from (`named`: `--rate`, `WORKER_RATE`, `job.toml:3: rate`; else the flag).

        Refused: bool (a TOML `true` is not a number), NaN, infinities, -0.0 (a sign a
        setting cannot have), floats where a whole number is needed, huge ints out of range.
        """
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._error(value, "a number", named)
        if self.whole and not isinstance(value, int):
            raise self._error(value, "a whole number", named)
        # Compare before any float(): an int with 400 digits has no float, but compares fine.
        if isinstance(value, float) and not math.isfinite(value):
            raise self._error(value, "a finite number", named)
        if isinstance(value, float) and value == 0 and math.copysign(1.0, value) < 0:
            raise self._error(value, "a number without a minus sign", named)
        below = value <= self.low if self.low_open else value < self.low
        above = value >= self.high if self.high_open else value > self.high
        if below or above:
            raise self._error(value, "", named)
        return value

    def _error(self, value: object, what: str, named: str) -> UsageError:
        shown = repr(value)
        if len(shown) > 24:  # 99999999999999999999999 is still readable; 400 digits are not
            shown = shown[:20] + "..."
        kind = f"{what} " if what else ""  # "must be in [0.2, 10000]", not "in range in ..."
        return UsageError(f"{named or '--' + self.flag} must be {kind}in {self}, not {shown}")


# Keys are the option names as on the command line (and in job files) without "--".
LIMITS: Final[dict[str, Limit]] = {
    limit.flag: limit
    for limit in (
        # Floor: at 0.2/s a request leaves every 5 s, so a run shows progress well inside any
        # deadline; it is also the cool-down's floor (pacing.budget.MIN_RATE), which a slower target
        # would sit under. 1e-300 was accepted and then waited 1e300 s for its first request.
        Limit(flag="rate", low=MIN_RATE_FLAG, high=10_000),
        Limit(flag="headroom", low=0, high=0.5, high_open=True),
        Limit(flag="concurrency", low=1, high=1000, whole=True),
        Limit(flag="max-attempts", low=1, high=100, whole=True),
        Limit(flag="item-deadline", low=0, high=86_400, low_open=True),
        Limit(flag="timeout", low=0, high=600, low_open=True),
        Limit(flag="grace", low=0, high=3600),
        Limit(flag="limiter-timeout", low=0, high=86_400, low_open=True),
        Limit(flag="max-delete", low=0, high=1_000_000, whole=True),
        Limit(flag="metrics-port", low=0, high=65535, whole=True),  # 0: any free port
        Limit(flag="metrics-push-interval", low=1, high=3600),
    )
}


def _positive(name: str, value: float) -> None:
    """Internal knobs (not flags): finite and positive, or a bug."""
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{name} must be a finite positive number, not {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    max_attempts: int = 8
    initial_s: float = 0.5
    max_delay_s: float = 30.0
    item_deadline_s: float = 300.0  # per item, across all its attempts
    retry_after_max_s: float = 60.0  # a server's Retry-After is honoured up to this

    def __post_init__(self) -> None:
        LIMITS["max-attempts"].check(self.max_attempts)
        LIMITS["item-deadline"].check(self.item_deadline_s)
        for name in ("initial_s", "max_delay_s", "retry_after_max_s"):
            _positive(name, getattr(self, name))
        if self.max_delay_s < self.initial_s:
            raise UsageError("backoff: need initial <= max delay")


@dataclass(frozen=True, slots=True, kw_only=True)
class Pacing:
    rate: float = float(spec.DOCUMENTED_RATE)  # the account's limit, requests per second
    headroom: float = DEFAULT_HEADROOM
    cooldown_s: float = 1.0  # pause for everyone after a FlowLimitExceeded
    recover_s: float = 10.0  # after the pause, time to climb from the lowered rate to the target
    # The headroom is where the margin starts; it then follows the jitter measured
    # (pacing/margin.py). False pins it (benchmarks and tests comparing against a fixed one).
    adapt: bool = True

    def __post_init__(self) -> None:
        LIMITS["rate"].check(self.rate)
        LIMITS["headroom"].check(self.headroom)
        _positive("cooldown_s", self.cooldown_s)
        _positive("recover_s", self.recover_s)

    @property
    def target(self) -> float:
        """What we actually aim at: the limit less the headroom."""
        return self.rate * (1 - self.headroom)


_REGION_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    manifest: Path
    ledger: Path
    endpoint: str = spec.DEFAULT_ENDPOINT
    region: str = spec.DEFAULT_REGION
    pacing: Pacing = field(default_factory=Pacing)
    concurrency: int | None = None  # None: the default (adaptive); else an explicit cap
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_s: float = 15.0  # one attempt, connect + answer
    grace_s: float = 10.0
    dry_run: bool = False
    skip_invalid: bool = False
    limiter_url: str | None = None
    limiter_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        check_endpoint(self.endpoint)
        # The region goes into the credential scope and a header: lowercase letters, digits
        # and dashes (cn-north-1), nothing a header could be split or smuggled with.
        if not _REGION_RE.fullmatch(self.region):
            raise UsageError(
                f"--region {self.region[:40]!r}: expected a region name such as cn-north-1 "
                "(lowercase letters, digits and dashes)"
            )
        if self.concurrency is not None:
            LIMITS["concurrency"].check(self.concurrency)
        if self.limiter_url is not None:
            check_limiter(self.limiter_url)
        LIMITS["timeout"].check(self.timeout_s)
        LIMITS["grace"].check(self.grace_s)
        LIMITS["limiter-timeout"].check(self.limiter_timeout_s)

    def public(self) -> dict[str, object]:
        """What the ledger header records: everything that shapes a run, no secrets."""
        return {
            "endpoint": redact_url(self.endpoint),
            "region": self.region,
            "rate": self.pacing.rate,
            "headroom": self.pacing.headroom,
            # What the runner really uses: an explicit cap, or the adaptive one.
            "concurrency": self.concurrency or f"adaptive, cap {DEFAULT_CAP}",
            "max_attempts": self.retry.max_attempts,
            "item_deadline_s": self.retry.item_deadline_s,
            "timeout_s": self.timeout_s,
            "skip_invalid": self.skip_invalid,
            "limiter": redact_url(self.limiter_url) if self.limiter_url else None,
        }


# -- URLs ---------------------------------------------------------------------------------

UNPARSABLE_URL: Final = "<unparsable URL>"
# Query or fragment parameters whose value is (or may be) a credential: exact names, and
# words that make any name containing them one. Over-redacting a harmless parameter costs
# nothing; missing one prints a secret.
_SECRET_NAMES: Final = frozenset({"sk", "pw", "pwd", "pass", "sig", "code"})
_SECRET_WORDS: Final = (
    "password",
    "passwd",
    "secret",
    "token",
    "signature",
    "credential",
    "auth",
    "key",
    "session",
)


def redact_url(url: str) -> str:
    """`url` fit to print or store: a userinfo password (or a bare userinfo token) and the
    values of password-like query and fragment parameters become ***, and characters a
    terminal would act on are escaped. Never raises: an unparsable URL is UNPARSABLE_URL."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if not netloc and "@" in url:
            return UNPARSABLE_URL  # "user:pw@host" without a scheme: no safe reading of it
        userinfo, at, host = netloc.rpartition("@")
        if at:
            user, colon, _ = userinfo.partition(":")
            netloc = f"{user}:***@{host}" if colon else f"***@{host}"
        # Built by hand: urlunsplit drops the "//" of schemes it does not know (unix:///...).
        slashes = "//" if netloc or "://" in url else ""
        query = f"?{_redact_params(parts.query)}" if parts.query else ""
        # A fragment is never sent, so nothing needs it in the clear: every value goes.
        fragment = f"#{_redact_params(parts.fragment, every=True)}" if parts.fragment else ""
        scheme = f"{parts.scheme}:" if parts.scheme else ""
        path = _redact_path(parts.path)
        redacted = f"{scheme}{slashes}{netloc}{path}{query}{fragment}"
    except Exception:  # any malformed input: a placeholder, never the raw text
        return UNPARSABLE_URL
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in redacted)


def _redact_path(path: str) -> str:
    """Path parameters (RFC 3986 `;name=value` in a segment, as in `/x;password=...`) are
    parameters too: password-like values become ***."""
    if ";" not in path:
        return path
    segments = []
    for segment in path.split("/"):
        head, semi, params = segment.partition(";")
        segments.append(head + semi + _redact_params(params, sep=";") if semi else segment)
    return "/".join(segments)


def _redact_params(text: str, sep: str = "&", *, every: bool = False) -> str:
    """Password-like values become *** (`every`: all values, and bare words too)."""
    out = []
    for part in text.split(sep):
        name, eq, _ = part.partition("=")
        if every:
            out.append(f"{name}=***" if eq else "***")
        else:
            out.append(f"{name}=***" if eq and is_secret_name(name) else part)
    return sep.join(out)


def secret_in_url(url: str) -> str | None:
    """What in `url` is a credential (a userinfo password or token, a password-like query,
    path or fragment parameter), said without its value; None when nothing is."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return None  # not a URL we can read; the option's own check says what is wrong
    if password is not None or parts.username:  # a bare user@ may be a token, too
        return "its user:password@ part"
    params = [
        *(p.partition("=")[0] for p in parts.query.split("&") if "=" in p),
        *(p.partition("=")[0] for p in parts.fragment.split("&") if "=" in p),
        *(p.partition("=")[0] for seg in parts.path.split("/") for p in seg.split(";")[1:]),
    ]
    for name in params:
        if is_secret_name(name):
            return f"its {spec.label(unquote_plus(name))} parameter"
    return None


def is_secret_name(name: str) -> bool:
    """True for a parameter name whose value is (or may be) a credential."""
    key = unquote_plus(name).lower().replace("-", "_")
    return key in _SECRET_NAMES or any(word in key for word in _SECRET_WORDS)


def is_loopback(host: str) -> bool:
    """True for `localhost` and for an IP literal in 127.0.0.0/8 or ::1 (also as an
    IPv4-mapped IPv6 address); a name such as 127.example.com is not a literal."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


Refusal = Callable[[str], UsageError]  # why -> the error naming the URL's source


def split_url(url: str, named: str, *, expected: str) -> tuple[SplitResult, Refusal]:
    """`url` split, and the refusal that names where it came from and shows it redacted
    (never the raw text: it may hold a password). Refused at once: empty, spaces or control
    characters, or nothing urlsplit can read (a port that is no number, out of 0..65535, a
    broken [v6] literal). The checks of each kind of URL (endpoint, limiter, Pushgateway)
    follow with the parts."""
    shown = redact_url(url)

    def refuse(why: str) -> UsageError:
        return UsageError(f"{named} {shown}: {why}")

    if not url or not all(c.isprintable() and not c.isspace() for c in url):
        raise refuse("empty, or holds spaces or control characters")
    try:
        parts = urlsplit(url)
        _ = parts.hostname, parts.port  # both parse lazily: a bad port raises here
    except ValueError:
        raise refuse(f"not a URL (expected {expected})") from None
    return parts, refuse


def check_endpoint(endpoint: str, named: str = "--endpoint") -> None:
    """A UsageError, showing only the redacted URL, unless `endpoint` is http(s)://HOST[:PORT]
    with no credentials in it, and plain http only to loopback."""
    parts, refuse = split_url(endpoint, named, expected="https://HOST[:PORT]")
    host, port = parts.hostname, parts.port
    if parts.scheme not in ("http", "https") or not host:
        raise refuse("expected http(s)://HOST[:PORT]")
    if "@" in parts.netloc:
        # Credentials never belong in the endpoint: requests are signed with the AK/SK.
        raise refuse("remove the user:password@ part; the worker signs with your AK/SK")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise refuse("give only scheme, host and port")
    if port == 0:
        raise refuse("port 0 is not a port to connect to")
    # Plain http would show the signed request (and any STS token) to the network.
    if parts.scheme == "http" and not is_loopback(host):
        raise refuse("plain http is allowed only to loopback (localhost, 127.0.0.0/8, ::1)")


# Query parameters a --limiter URL may carry, and what each value must be. redis-py takes any
# name and hands it to the connection (an unknown one failed at the first connect, with a
# traceback), and it reads a bad value only once the run starts: both are checked here.
_WHOLE, _SECONDS, _BOOL = "a whole number", "a positive number of seconds", "true or false"
_LIMITER_PARAMS: Final = {
    "db": _WHOLE,
    "socket_timeout": _SECONDS,
    "socket_connect_timeout": _SECONDS,
    "socket_keepalive": _BOOL,
    "health_check_interval": _WHOLE,
    "client_name": "a name",
    "ssl_check_hostname": _BOOL,
    "ssl_cert_reqs": "none, optional or required",
    "username": "a name",
    "password": "a password",
}
_BOOLS: Final = frozenset({"0", "1", "true", "false", "yes", "no", "on", "off", "t", "f"})


def _param_ok(kind: str, value: str) -> bool:
    if kind == _WHOLE:
        return value.isascii() and value.isdigit() and len(value) <= 9
    if kind == _SECONDS:
        try:
            seconds = float(value)
        except ValueError:
            return False
        return math.isfinite(seconds) and 0 < seconds <= 3600
    if kind == _BOOL:
        return value.lower() in _BOOLS
    if kind == _LIMITER_PARAMS["ssl_cert_reqs"]:
        return value in ("none", "optional", "required")
    if kind == _LIMITER_PARAMS["password"]:
        return bool(value)
    return bool(value) and value.isprintable() and len(value) <= 128


def check_limiter(url: str, named: str = "--limiter") -> None:
    """A UsageError, showing only the redacted URL, unless `url` is a Redis URL redis-py
    reads as it is written: redis(s)://[USER:PASSWORD@]HOST[:PORT][/DB] or unix://PATH, a port
    in 1..65535, only the query parameters in _LIMITER_PARAMS with good values, each once,
    no `?db=` that says otherwise than the path, no #fragment."""
    parts, refuse = split_url(url, named, expected="redis://HOST:PORT/DB; a port in 1..65535")
    host, port = parts.hostname, parts.port
    if parts.scheme not in ("redis", "rediss", "unix") or "://" not in url:
        raise refuse("expected redis://HOST:PORT/DB (or rediss://, unix://PATH)")
    if parts.fragment or url.endswith("#"):
        raise refuse("a #fragment has no meaning in a Redis URL; remove it")
    if port == 0:
        raise refuse("port 0 is not a port to connect to")
    path_db: str | None = None
    if parts.scheme == "unix":
        if not parts.path:
            raise refuse("expected unix:///path/to/redis.sock")
    else:
        if not host:
            raise refuse("expected redis://HOST:PORT/DB: no host")
        path_db = parts.path.strip("/") or None
        if path_db is not None and not _param_ok(_WHOLE, path_db):
            # The raw path is not shown: it may hold ;password=... (redacted in `shown`).
            raise refuse("the path must be the database number alone, as in /3")
    _check_limiter_query(parts.query, path_db, refuse)


def _check_limiter_query(
    query: str, path_db: str | None, refuse: Callable[[str], UsageError]
) -> None:
    seen: set[str] = set()
    for name, value in parse_qsl(query, keep_blank_values=True):
        kind = _LIMITER_PARAMS.get(name)
        if kind is None:
            known = ", ".join(_LIMITER_PARAMS)
            raise refuse(f"unknown parameter {spec.shown(name)} (known: {known})")
        if name in seen:
            raise refuse(f"{name} is given twice")
        seen.add(name)
        if not _param_ok(kind, value):
            shown = "''" if is_secret_name(name) and not value else spec.shown(value)
            raise refuse(f"{name} must be {kind}, not {shown}")
        if name == "db" and path_db is not None and int(value) != int(path_db):
            raise refuse(f"?db={value} and the path's /{path_db} name different databases")


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandOptions:
    """What a command adds to Settings: where the account is and how to report."""

    sandbox_account: Path | None = None  # --sandbox: the embedded account's state file
    profile: str | None = None
    retry_rejected: bool = False
    json: bool = False
    job_name: str = ""  # the job file's stem, else the manifest's: the metrics' job_name
    metrics_file: Path | None = None
    log_file: Path | None = None  # --log-file: checked (logfile.check_log_file), not opened
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    metrics_push: str | None = None  # a Pushgateway's URL (metrics_push.check_push_url)
    metrics_push_interval_s: float = 15.0
