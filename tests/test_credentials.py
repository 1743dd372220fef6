"""Credentials: every documented source in its documented order, and no credential value in
any message or traceback."""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from typing import Any

import pytest

from worker.api.credentials import MAX_FILE_BYTES, Loaded, load
from worker.api.signing import Credentials
from worker.errors import CredentialsError

SECRET = "SkS3cr3tValue"


def ve_config(home: Path, profiles: dict[str, dict[str, Any]], current: str = "") -> Path:
    path = home / ".volcengine" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"current": current, "profiles": profiles, "enableColor": False}))
    return path


def volc_ini(home: Path, text: str) -> Path:
    path = home / ".volc" / "credentials"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def refused(env: dict[str, str], home: Path, profile: str | None = None) -> str:
    """The error's message, checked to hold no secret in it, its cause, context or traceback."""
    with pytest.raises(CredentialsError) as info:
        load(env, home, profile)
    exc = info.value
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)
    text = "".join(traceback.format_exception(exc))
    assert SECRET not in text and "s3cr3t" not in text.lower()
    return str(exc)


def test_volcengine_variables_as_the_ve_cli_reads_them(tmp_path: Path) -> None:
    """VOLCENGINE_ACCESS_KEY/SECRET_KEY/SESSION_TOKEN/REGION are read; the source is named."""
    env = {
        "VOLCENGINE_ACCESS_KEY": "AK1",
        "VOLCENGINE_SECRET_KEY": SECRET,
        "VOLCENGINE_SESSION_TOKEN": "TOK",
        "VOLCENGINE_REGION": "cn-north-1",
    }
    loaded = load(env, tmp_path)
    assert loaded == Loaded(
        credentials=Credentials(access_key="AK1", secret_key=SECRET, session_token="TOK"),
        source="environment (VOLCENGINE_*)",
        region="cn-north-1",
    )
    assert SECRET not in repr(loaded) and "TOK" not in repr(loaded)


def test_volc_variables_still_work(tmp_path: Path) -> None:
    """Today's VOLC_ACCESSKEY/VOLC_SECRETKEY/VOLC_SESSION_TOKEN keep working; no region."""
    loaded = load({"VOLC_ACCESSKEY": "AK2", "VOLC_SECRETKEY": SECRET}, tmp_path)
    assert loaded.credentials.access_key == "AK2" and loaded.region is None
    assert loaded.source == "environment (VOLC_*)"


def test_two_variable_families_naming_different_accounts_are_an_error(tmp_path: Path) -> None:
    """Both pairs set to different keys: refuse rather than guess; the same keys are fine."""
    env = {
        "VOLCENGINE_ACCESS_KEY": "AK1",
        "VOLCENGINE_SECRET_KEY": SECRET,
        "VOLC_ACCESSKEY": "AK2",
        "VOLC_SECRETKEY": SECRET,
    }
    assert "both set, to different credentials" in refused(env, tmp_path)
    env.update(VOLC_ACCESSKEY="AK1")
    assert load(env, tmp_path).source == "environment (VOLCENGINE_*)"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"VOLCENGINE_ACCESS_KEY": "AK"},
            "VOLCENGINE_SECRET_KEY not set (but VOLCENGINE_ACCESS_KEY is)",
        ),
        ({"VOLC_SECRETKEY": SECRET}, "VOLC_ACCESSKEY not set (but VOLC_SECRETKEY is)"),
        ({"VOLC_SESSION_TOKEN": "T"}, "VOLC_ACCESSKEY and VOLC_SECRETKEY not set"),
    ],
)
def test_half_a_pair_is_an_error_naming_what_is_missing(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    """Half a pair (or a lone token) never falls through to another source."""
    volc_ini(tmp_path, f"[default]\naccess_key_id = AKFILE\nsecret_access_key = {SECRET}\n")
    assert message in refused(env, tmp_path)


@pytest.mark.parametrize("bad", ["\n", "\r", "\r\n", "\x00", "\x1b", "\x7f"])
def test_control_characters_in_an_environment_secret_are_refused(tmp_path: Path, bad: str) -> None:
    """A CR/LF (or any control character) in a value is refused naming source and field."""
    env = {"VOLC_ACCESSKEY": "AK", "VOLC_SECRETKEY": SECRET + bad}
    message = refused(env, tmp_path)
    assert message.startswith("environment (VOLC_*): VOLC_SECRETKEY holds a control character")


@pytest.mark.parametrize(
    ("value", "what"), [(" AK", "a space"), ("AK\u00e9", "a non-ASCII character")]
)
def test_spaces_and_non_ascii_in_a_key_are_refused(tmp_path: Path, value: str, what: str) -> None:
    """A key is printable ASCII: a pasted space or a look-alike letter is named, not sent."""
    message = refused({"VOLCENGINE_ACCESS_KEY": value, "VOLCENGINE_SECRET_KEY": SECRET}, tmp_path)
    assert message == f"environment (VOLCENGINE_*): VOLCENGINE_ACCESS_KEY holds {what}"


def test_percent_in_the_ini_secret_is_a_plain_character(tmp_path: Path) -> None:
    """A % in ~/.volc/credentials is read as it is (no interpolation), with its token."""
    secret = "ab%cd%(x)s%%"
    volc_ini(
        tmp_path,
        f"[default]\naccess_key_id = AK\nsecret_access_key = {secret}\nsession_token = T%1\n",
    )
    loaded = load({}, tmp_path)
    assert loaded.credentials == Credentials(
        access_key="AK", secret_key=secret, session_token="T%1"
    )
    assert loaded.source == f"{tmp_path / '.volc' / 'credentials'} [default]"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"secret_access_key = {SECRET}\n", "line 1: a key before any [section]"),
        (f"[default]\naccess_key_id = AK\n{SECRET}\n", "line 3: not `key = value`"),
        (
            f"[default]\nsecret_access_key = {SECRET}\nsecret_access_key = {SECRET}\n",
            "line 3: secret_access_key is given twice",
        ),
        (
            f"[default]\naccess_key_id = AK\nsecret_access_key = {SECRET}\n  {SECRET}\n",
            "secret_access_key holds a control character",
        ),
        ("[default]\naccess_key_id = AK\n", "needs access_key_id and secret_access_key"),
        ("[other]\naccess_key_id = AK\n", "no [default] section"),
    ],
)
def test_a_broken_ini_is_named_without_its_lines(tmp_path: Path, text: str, message: str) -> None:
    """configparser's messages quote the offending line; ours give the line number only."""
    volc_ini(tmp_path, text)
    assert message in refused({}, tmp_path)


def test_volc_json_config(tmp_path: Path) -> None:
    """~/.volc/config (JSON ak/sk) is the fourth source; broken JSON is named, not quoted."""
    path = tmp_path / ".volc" / "config"
    path.parent.mkdir()
    path.write_text(json.dumps({"ak": "AKJ", "sk": SECRET}))
    assert load({}, tmp_path).credentials.access_key == "AKJ"
    path.write_text('{"ak": "AKJ", "sk": "' + SECRET + '",}')
    assert refused({}, tmp_path) == f"{path}: cannot read it (not valid JSON)"


def test_ve_profile_by_name(tmp_path: Path) -> None:
    """--profile NAME reads the ve CLI's config.json profile, with its region and token."""
    path = ve_config(
        tmp_path,
        {
            "dev": {
                "name": "dev",
                "mode": "ak",
                "access-key": "AKDEV",
                "secret-key": "x",
                "region": "cn-north-1",
            },
            "prod": {
                "name": "prod",
                "mode": "ak",
                "access-key": "AKPROD",
                "secret-key": SECRET,
                "session-token": "TOK",
                "region": "cn-beijing",
                "disable-ssl": False,
            },
        },
        current="dev",
    )
    loaded = load({"VOLC_ACCESSKEY": "AKENV", "VOLC_SECRETKEY": "y"}, tmp_path, profile="prod")
    assert loaded == Loaded(
        credentials=Credentials(access_key="AKPROD", secret_key=SECRET, session_token="TOK"),
        source=f"ve profile prod ({path})",
        region="cn-beijing",
    )


def test_profile_falls_back_to_a_volc_credentials_section(tmp_path: Path) -> None:
    """A profile not in config.json is a section of ~/.volc/credentials; its region may come
    from VOLCENGINE_REGION."""
    ve_config(tmp_path, {"dev": {"access-key": "AKDEV", "secret-key": "x"}})
    ini = volc_ini(
        tmp_path,
        f"[default]\naccess_key_id = A\nsecret_access_key = B\n"
        f"[prod]\naccess_key_id = AKINI\nsecret_access_key = {SECRET}\n",
    )
    loaded = load({"VOLCENGINE_REGION": "cn-north-1"}, tmp_path, profile="prod")
    assert loaded.credentials.access_key == "AKINI" and loaded.source == f"{ini} [prod]"
    assert loaded.region == "cn-north-1"


def test_an_unknown_profile_lists_what_exists(tmp_path: Path) -> None:
    """An unknown profile names both places and the profiles in them, no values."""
    ve_config(tmp_path, {"dev": {"access-key": "AKDEV", "secret-key": SECRET}})
    volc_ini(tmp_path, f"[default]\naccess_key_id = A\nsecret_access_key = {SECRET}\n")
    message = refused({"VOLC_ACCESSKEY": "AK", "VOLC_SECRETKEY": SECRET}, tmp_path, "prod")
    assert message.startswith("profile prod not found; looked in ")
    assert "(profiles: dev)" in message and "(sections: default)" in message


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        (
            {"mode": "ramrolearn", "access-key": "AK", "secret-key": SECRET, "role-name": "r"},
            "mode 'ramrolearn' needs an STS exchange",
        ),
        ({"mode": "sso", "sso-session-name": "s"}, "run `ve sso login`"),
        (
            {"mode": "ak", "access-key": "AK", "secret-key": SECRET + "\n"},
            "secret-key holds a control character",
        ),
        (
            {"mode": "ak", "access-key": "AK", "secret-key": SECRET, "region": "cn\r\nX: y"},
            "is not a region name",
        ),
        ({"mode": "ak", "access-key": 5, "secret-key": SECRET}, "access-key must be a string"),
    ],
)
def test_unusable_ve_profiles_are_explained(
    tmp_path: Path, profile: dict[str, Any], message: str
) -> None:
    """Profiles the worker cannot sign with say why, naming the field, never the value."""
    ve_config(tmp_path, {"p": profile})
    assert message in refused({}, tmp_path, "p")


def test_the_documented_order(tmp_path: Path) -> None:
    """VOLCENGINE_* > VOLC_* > ~/.volc/credentials > ~/.volc/config > ve current profile."""
    ve_config(tmp_path, {"cur": {"access-key": "AK5", "secret-key": "s"}}, current="cur")
    assert load({}, tmp_path).credentials.access_key == "AK5"
    (tmp_path / ".volc").mkdir()
    (tmp_path / ".volc" / "config").write_text(json.dumps({"ak": "AK4", "sk": "s"}))
    assert load({}, tmp_path).credentials.access_key == "AK4"
    volc_ini(tmp_path, "[default]\naccess_key_id = AK3\nsecret_access_key = s\n")
    assert load({}, tmp_path).credentials.access_key == "AK3"
    env = {"VOLC_ACCESSKEY": "AK2", "VOLC_SECRETKEY": "s"}
    assert load(env, tmp_path).credentials.access_key == "AK2"
    env |= {"VOLCENGINE_ACCESS_KEY": "AK2", "VOLCENGINE_SECRET_KEY": "s"}
    assert load(env, tmp_path).source == "environment (VOLCENGINE_*)"


def test_nothing_found_says_where_to_put_them(tmp_path: Path) -> None:
    """No source at all: one message listing the ways."""
    assert refused({}, tmp_path).startswith("no credentials found: set VOLCENGINE_ACCESS_KEY")


def test_a_credentials_path_that_is_a_fifo_or_huge_is_refused_without_hanging(
    tmp_path: Path,
) -> None:
    """Files are read bounded and only when regular: a FIFO does not block, 2 MiB is refused."""
    path = tmp_path / ".volc" / "credentials"
    path.parent.mkdir()
    os.mkfifo(path)
    assert refused({}, tmp_path) == f"{path}: not a regular file"
    path.unlink()
    path.write_text("[default]\n" + "#" * (MAX_FILE_BYTES + 1))
    assert "larger than" in refused({}, tmp_path)


# --profile does not read ~/.volc/config: that pair is not a case.
@pytest.mark.parametrize(
    ("where", "profile"),
    [
        (where, profile)
        for where in (".volc/credentials", ".volc/config", ".volcengine/config.json")
        for profile in (None, "default")
        if not (profile is not None and where == ".volc/config")
    ],
)
def test_a_credentials_path_that_is_a_directory_is_named(
    tmp_path: Path, where: str, profile: str | None
) -> None:
    """A secret mounted as a folder (no subPath) is an error naming it, not IsADirectoryError."""
    path = tmp_path / where
    path.mkdir(parents=True)
    assert refused({}, tmp_path, profile).startswith(f"{path}: not a regular file: a directory")


def test_a_credentials_path_too_long_is_named(tmp_path: Path) -> None:
    """A HOME whose names the file system cannot hold is an error naming the file."""
    home = tmp_path / ("h" * 300)
    assert "cannot open it (File name too long)" in refused({}, home)
