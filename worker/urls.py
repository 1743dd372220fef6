"""URLs a user gives (--endpoint, --limiter, a Pushgateway): checked once, before anything is
sent, and redacted wherever one is printed or stored: `redact_url` is the one way a URL
reaches a message, a log line or the ledger.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable
from typing import Final
from urllib.parse import SplitResult, parse_qsl, unquote_plus, urlsplit

from worker.api import spec
from worker.errors import UsageError

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
