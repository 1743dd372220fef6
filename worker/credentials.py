"""Where credentials come from, as the official SDKs look for them.

Order: VOLC_ACCESSKEY + VOLC_SECRETKEY (+ VOLC_SESSION_TOKEN) in the environment; else
~/.volc/credentials (INI, section [default]: access_key_id, secret_access_key, session_token);
else ~/.volc/config (JSON: ak, sk, or AccessKeyId/SecretAccessKey).
"""

from __future__ import annotations

import configparser
from collections.abc import Mapping
from pathlib import Path

import orjson

from worker.errors import CredentialsError
from worker.signing import Credentials

HINT = ("set VOLC_ACCESSKEY and VOLC_SECRETKEY (and VOLC_SESSION_TOKEN for STS), "
        "write ~/.volc/credentials, or try the sandbox with --sandbox")


def load(env: Mapping[str, str], home: Path) -> Credentials:
    ak, sk = env.get("VOLC_ACCESSKEY", ""), env.get("VOLC_SECRETKEY", "")
    if ak or sk:
        if not (ak and sk):
            missing = "VOLC_SECRETKEY" if ak else "VOLC_ACCESSKEY"
            raise CredentialsError(f"{missing} is not set (the other half of the pair is)")
        return Credentials(access_key=ak, secret_key=sk,
                           session_token=env.get("VOLC_SESSION_TOKEN", ""))
    ini = home / ".volc" / "credentials"
    if ini.exists():
        return _from_ini(ini)
    js = home / ".volc" / "config"
    if js.exists():
        return _from_json(js)
    raise CredentialsError(f"no credentials found: {HINT}")


def _from_ini(path: Path) -> Credentials:
    parser = configparser.ConfigParser()
    try:
        with path.open(encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise CredentialsError(f"{path}: cannot read it ({_short(exc)})") from None
    if not parser.has_section("default"):
        raise CredentialsError(f"{path}: no [default] section")
    section = parser["default"]
    ak, sk = section.get("access_key_id", ""), section.get("secret_access_key", "")
    if not (ak and sk):
        raise CredentialsError(f"{path}: [default] needs access_key_id and secret_access_key")
    return Credentials(access_key=ak, secret_key=sk,
                       session_token=section.get("session_token", ""))


def _from_json(path: Path) -> Credentials:
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise CredentialsError(f"{path}: cannot read it ({_short(exc)})") from None
    if not isinstance(data, dict):
        raise CredentialsError(f"{path}: expected a JSON object")
    ak = data.get("ak") or data.get("AccessKeyId") or ""
    sk = data.get("sk") or data.get("SecretAccessKey") or ""
    if not (isinstance(ak, str) and isinstance(sk, str) and ak and sk):
        raise CredentialsError(f"{path}: needs string fields ak and sk")
    token = data.get("session_token") or data.get("SessionToken") or ""
    return Credentials(access_key=ak, secret_key=sk, session_token=str(token))


def _short(exc: Exception) -> str:
    # Never echo file contents: a parse error message could quote the secret.
    return type(exc).__name__ if not isinstance(exc, OSError) else (exc.strerror or "error")
