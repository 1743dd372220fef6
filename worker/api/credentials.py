"""Where credentials come from: the places the official SDKs and the `ve` CLI keep them.

Tried in this order; the first source that holds credentials is used, and a source that
holds broken ones is an error (never a silent fall-through to another account):

With --profile NAME:
  1. the `ve` CLI's profile NAME: ~/.volcengine/config.json, {"profiles": {NAME: {"access-key",
     "secret-key", "session-token", "region", "mode"}}} (as `ve configure set` writes it)
  2. the section [NAME] of ~/.volc/credentials
Without it:
  1. VOLCENGINE_ACCESS_KEY + VOLCENGINE_SECRET_KEY (+ VOLCENGINE_SESSION_TOKEN), as `ve` reads
  2. VOLC_ACCESSKEY + VOLC_SECRETKEY (+ VOLC_SESSION_TOKEN), as the SDKs read
     (both pairs set to different credentials is an error: which account was meant?)
  3. ~/.volc/credentials, section [default]: access_key_id, secret_access_key, session_token
  4. ~/.volc/config (JSON: ak, sk or AccessKeyId, SecretAccessKey; session_token)
  5. the `ve` CLI's current profile (config.json "current")

The region a source names (a `ve` profile's "region", else VOLCENGINE_REGION) comes back
beside the credentials; the caller's --region wins over it.

No credential value ever reaches a message or a traceback: errors name the source and the
field, parse errors are rewritten without the offending line, and every re-raise drops its
context (`from None`). Values holding a control character (a CR or LF pasted along), a space
or a non-ASCII character are refused: they cannot be a key, and a CR/LF would end up inside
an HTTP header.
"""

from __future__ import annotations

import configparser
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from worker.api import spec
from worker.api.signing import Credentials
from worker.errors import CredentialsError

MAX_FILE_BYTES: Final = 1 << 20  # a credentials file is a few hundred bytes
VE_CONFIG: Final = Path(".volcengine") / "config.json"
VOLC_INI: Final = Path(".volc") / "credentials"
VOLC_JSON: Final = Path(".volc") / "config"
# Modes of a `ve` profile whose keys we can sign with as they are. ramrolearn, oidc and
# ecsrole need an STS exchange first (their access-key, if any, is not the role's).
_VE_STATIC_MODES: Final = frozenset({"", "ak", "sso", "console-login"})
_REGION: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")

HINT: Final = (
    "set VOLCENGINE_ACCESS_KEY and VOLCENGINE_SECRET_KEY (or VOLC_ACCESSKEY and "
    "VOLC_SECRETKEY), name a profile with --profile, write ~/.volc/credentials, "
    "or try the sandbox with --sandbox"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Loaded:
    """Credentials, where they came from (no secret in it) and the region that source names."""

    credentials: Credentials
    source: str  # e.g. "environment (VOLCENGINE_*)", "ve profile prod (/home/u/.volcengine/...)"
    region: str | None = None  # None: the source names none


def load(env: Mapping[str, str], home: Path, profile: str | None = None) -> Loaded:
    """The credentials to sign with, from the first source in the module's order."""
    if profile is not None:
        return _profile(env, home, profile)
    for prefix in ("VOLCENGINE", "VOLC"):
        found = _from_env(env, prefix)
        if found is not None:
            other = _from_env(env, "VOLC" if prefix == "VOLCENGINE" else "VOLCENGINE")
            if other is not None and other.credentials != found.credentials:
                raise CredentialsError(
                    "VOLCENGINE_ACCESS_KEY/VOLCENGINE_SECRET_KEY and VOLC_ACCESSKEY/"
                    "VOLC_SECRETKEY are both set, to different credentials: unset one pair"
                )
            return found
    ini = home / VOLC_INI
    if (text := _read(ini)) is not None:
        loaded = _from_ini(ini, text, "default")
        if loaded is None:
            raise CredentialsError(f"{ini}: no [default] section (or use --profile NAME)")
        return _with_env_region(loaded, env)
    js = home / VOLC_JSON
    if (text := _read(js)) is not None:
        return _with_env_region(_from_volc_json(js, text), env)
    ve = home / VE_CONFIG
    if (text := _read(ve)) is not None:
        config = _ve_config(ve, text)
        current = config.get("current")
        if isinstance(current, str) and current:
            return _from_ve(ve, config, current, env)
    raise CredentialsError(f"no credentials found: {HINT}")


def _profile(env: Mapping[str, str], home: Path, name: str) -> Loaded:
    if not name or not name.isprintable() or len(name) > 128:
        raise CredentialsError(f"--profile {spec.shown(name)}: not a profile name")
    ve, ini = home / VE_CONFIG, home / VOLC_INI
    looked: list[str] = []
    if (text := _read(ve)) is not None:
        config = _ve_config(ve, text)
        profiles = config.get("profiles")
        if isinstance(profiles, dict) and name in profiles:
            return _from_ve(ve, config, name, env)
        looked.append(f"{ve} (profiles: {_names(profiles)})")
    else:
        looked.append(f"{ve} (absent)")
    if (text := _read(ini)) is not None:
        loaded = _from_ini(ini, text, name)
        if loaded is not None:
            return _with_env_region(loaded, env)
        looked.append(f"{ini} (sections: {_names(_ini(ini, text).sections())})")
    else:
        looked.append(f"{ini} (absent)")
    raise CredentialsError(f"profile {spec.label(name)} not found; looked in {'; '.join(looked)}")


def _names(items: object) -> str:
    names = (
        sorted(k for k in items if isinstance(k, str)) if isinstance(items, (dict, list)) else []
    )
    return ", ".join(spec.label(n) for n in names[:20]) or "none"


# -- environment --------------------------------------------------------------------------


def _from_env(env: Mapping[str, str], prefix: str) -> Loaded | None:
    """VOLCENGINE_ACCESS_KEY... or VOLC_ACCESSKEY...; None when that family is not set."""
    if prefix == "VOLCENGINE":
        names = ("VOLCENGINE_ACCESS_KEY", "VOLCENGINE_SECRET_KEY", "VOLCENGINE_SESSION_TOKEN")
    else:
        names = ("VOLC_ACCESSKEY", "VOLC_SECRETKEY", "VOLC_SESSION_TOKEN")
    ak_name, sk_name, token_name = names
    ak, sk, token = (env.get(n, "") for n in names)
    if not (ak or sk or token):
        return None
    if not (ak and sk):
        missing = [n for n, v in ((ak_name, ak), (sk_name, sk)) if not v]
        given = [n for n, v in zip(names, (ak, sk, token), strict=True) if v]
        raise CredentialsError(
            f"{' and '.join(missing)} not set (but {', '.join(given)} is): set the pair"
        )
    source = f"environment ({prefix}_*)"
    creds = _credentials(source, (ak_name, ak), (sk_name, sk), (token_name, token))
    return _with_env_region(Loaded(credentials=creds, source=source), env)


def _with_env_region(loaded: Loaded, env: Mapping[str, str]) -> Loaded:
    if loaded.region is not None or not (region := env.get("VOLCENGINE_REGION", "")):
        return loaded
    return Loaded(
        credentials=loaded.credentials,
        source=loaded.source,
        region=_region("environment", "VOLCENGINE_REGION", region),
    )


# -- ~/.volc ------------------------------------------------------------------------------


def _from_ini(path: Path, text: str, section: str) -> Loaded | None:
    """The section's credentials; None when the file has no such section."""
    parser = _ini(path, text)
    if not parser.has_section(section):
        return None
    values = parser[section]
    source = f"{path} [{spec.label(section)}]"
    ak, sk = values.get("access_key_id", ""), values.get("secret_access_key", "")
    if not (ak and sk):
        raise CredentialsError(f"{source}: needs access_key_id and secret_access_key")
    creds = _credentials(
        source,
        ("access_key_id", ak),
        ("secret_access_key", sk),
        ("session_token", values.get("session_token", "")),
    )
    return Loaded(credentials=creds, source=source)


def _ini(path: Path, text: str) -> configparser.ConfigParser:
    # interpolation=None: a % in a secret is a character, not syntax (with interpolation a
    # stray % raised an error whose message quoted the secret).
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as exc:
        raise CredentialsError(f"{path}: cannot read it ({_ini_error(exc)})") from None
    return parser


def _ini_error(exc: configparser.Error) -> str:
    """What is wrong and where, without the line itself (it may be a secret)."""
    if isinstance(exc, configparser.MissingSectionHeaderError):
        return f"line {exc.lineno}: a key before any [section]"
    if isinstance(exc, configparser.DuplicateOptionError):
        return f"line {exc.lineno}: {spec.label(exc.option)} is given twice in its section"
    if isinstance(exc, configparser.DuplicateSectionError):
        return f"line {exc.lineno}: section [{spec.label(exc.section)}] is given twice"
    if isinstance(exc, configparser.ParsingError):
        lines = ", ".join(str(n) for n, _ in exc.errors[:10])
        return f"line {lines}: not `key = value`"
    return type(exc).__name__


def _from_volc_json(path: Path, text: str) -> Loaded:
    data = _json(path, text)
    source = str(path)
    ak_field = "ak" if "ak" in data else "AccessKeyId"
    sk_field = "sk" if "sk" in data else "SecretAccessKey"
    token_field = "session_token" if "session_token" in data else "SessionToken"
    ak, sk, token = data.get(ak_field, ""), data.get(sk_field, ""), data.get(token_field, "")
    if not (ak and sk):
        raise CredentialsError(f"{source}: needs ak and sk (or AccessKeyId and SecretAccessKey)")
    creds = _credentials(source, (ak_field, ak), (sk_field, sk), (token_field, token))
    return Loaded(credentials=creds, source=source)


# -- the ve CLI ---------------------------------------------------------------------------


def _ve_config(path: Path, text: str) -> dict[str, Any]:
    return _json(path, text)


def _from_ve(path: Path, config: dict[str, Any], name: str, env: Mapping[str, str]) -> Loaded:
    profiles = config.get("profiles")
    profile = profiles.get(name) if isinstance(profiles, dict) else None
    source = f"ve profile {spec.label(name)} ({path})"
    if not isinstance(profile, dict):
        raise CredentialsError(f"{source}: no such profile, or it is not a JSON object")
    mode = profile.get("mode") or ""
    if mode not in _VE_STATIC_MODES:
        raise CredentialsError(
            f"{source}: mode {spec.shown(mode)} needs an STS exchange the worker does not "
            "do; use an `ak` profile, or export the temporary keys as VOLCENGINE_*"
        )
    ak, sk = profile.get("access-key") or "", profile.get("secret-key") or ""
    if not (ak and sk):
        hint = (
            "run `ve sso login` (or `ve login`) first"
            if mode
            else "set them with `ve configure set`"
        )
        raise CredentialsError(f"{source}: holds no access-key and secret-key; {hint}")
    creds = _credentials(
        source,
        ("access-key", ak),
        ("secret-key", sk),
        ("session-token", profile.get("session-token") or ""),
    )
    region = profile.get("region") or None
    loaded = Loaded(
        credentials=creds,
        source=source,
        region=None if region is None else _region(source, "region", region),
    )
    return _with_env_region(loaded, env)


# -- values and files ---------------------------------------------------------------------


def _credentials(
    source: str, ak: tuple[str, object], sk: tuple[str, object], token: tuple[str, object]
) -> Credentials:
    return Credentials(
        access_key=_value(source, *ak),
        secret_key=_value(source, *sk),
        session_token=_value(source, *token, required=False),
    )


def _value(source: str, name: str, value: object, *, required: bool = True) -> str:
    """`value` if it can be a key: printable ASCII without spaces. The message names the
    source and the field, never the value."""
    if not isinstance(value, str):
        raise CredentialsError(f"{source}: {name} must be a string")
    if not value:
        if required:
            raise CredentialsError(f"{source}: {name} is empty")
        return value
    for c in value:
        if ord(c) < 0x20 or ord(c) == 0x7F:
            raise CredentialsError(
                f"{source}: {name} holds a control character (a CR or LF pasted along?); "
                "write it again on one line"
            )
        if c == " ":
            raise CredentialsError(f"{source}: {name} holds a space")
        if ord(c) > 0x7E:
            raise CredentialsError(f"{source}: {name} holds a non-ASCII character")
    return value


def _region(source: str, name: str, value: object) -> str:
    if not isinstance(value, str) or not _REGION.fullmatch(value):
        raise CredentialsError(f"{source}: {name} {spec.shown(value)} is not a region name")
    return value


def _json(path: Path, text: str) -> dict[str, Any]:
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:  # its message may quote the text around the error
        raise CredentialsError(f"{path}: cannot read it (not valid JSON)") from None
    if not isinstance(data, dict):
        raise CredentialsError(f"{path}: expected a JSON object")
    return data


def _read(path: Path) -> str | None:
    """The file's text, None if it does not exist; bounded, regular files only."""
    try:
        # O_NONBLOCK: a FIFO planted at this path must not hang the start-up.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:  # unreadable, a name too long, a parent that is a file
        raise CredentialsError(f"{path}: cannot open it ({exc.strerror})") from None
    # Checked before open(): it raises IsADirectoryError on a directory's descriptor, and
    # a directory here is common (a Kubernetes secret mounted without subPath).
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise CredentialsError(f"{path}: cannot read it ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "a directory (a secret mounted without subPath?)" if stat.S_ISDIR(mode) else ""
        raise CredentialsError(f"{path}: not a regular file{': ' + what if what else ''}")
    with open(fd, "rb") as f:
        try:
            data = f.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise CredentialsError(f"{path}: cannot read it ({exc.strerror})") from None
    if len(data) > MAX_FILE_BYTES:
        raise CredentialsError(
            f"{path}: larger than {MAX_FILE_BYTES} bytes; not a credentials file"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CredentialsError(f"{path}: not UTF-8 text") from None
