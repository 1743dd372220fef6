"""What the user gives the CLI, end to end: manifests from pipes and devices, Names, credentials
from every source, numbers and URLs. Real processes against the sandbox process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AK, SK, SandboxProc, cli_env, names, run_worker, worker_cmd

pytestmark = pytest.mark.slow  # real processes: `pytest -m 'not slow'` skips them

GROUPS = names(6)
MANIFEST = "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in GROUPS).encode()
FAST = ("--rate", "50")


def sandbox(factory: Any, keys: dict[str, str] | None = None) -> SandboxProc:
    sb: SandboxProc = factory(*FAST, keys=keys)
    return sb


def created(sb: SandboxProc) -> set[str]:
    return {name for name, g in sb.groups().items() if g["created"] == 1}


def no_secrets_env(home: Path) -> dict[str, str]:
    env = cli_env(home, ak="", sk="")
    return {k: v for k, v in env.items() if not k.startswith(("VOLC_", "VOLCENGINE_"))}


def assert_clean_refusal(out: subprocess.CompletedProcess[str], *absent: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr
    for text in absent:
        assert text not in out.stderr and text not in out.stdout


# -- manifests that are not regular files -------------------------------------------------


def test_run_from_a_fifo_creates_every_group(sandbox_factory: Any, tmp_path: Path) -> None:
    """A named pipe is read once and every line is sent: no silent exit 0 with nothing done."""
    sb = sandbox(sandbox_factory)
    fifo = tmp_path / "groups.jsonl"
    os.mkfifo(fifo)

    def write() -> None:
        with fifo.open("wb") as f:
            f.write(MANIFEST)

    writer = threading.Thread(target=write)
    writer.start()
    out = run_worker(
        "run",
        str(fifo),
        "--endpoint",
        sb.url,
        "--ledger",
        str(tmp_path / "l.jsonl"),
        *FAST,
        env=cli_env(tmp_path),
    )
    writer.join(timeout=10)
    assert out.returncode == 0, out.stderr
    assert created(sb) == {g["Name"] for g in GROUPS}


def test_run_from_dev_stdin_creates_every_group(sandbox_factory: Any, tmp_path: Path) -> None:
    """`cat m | worker run /dev/stdin` validates and sends every line."""
    sb = sandbox(sandbox_factory)
    out = subprocess.run(
        worker_cmd(
            "run", "/dev/stdin", "--endpoint", sb.url, "--ledger", str(tmp_path / "l.jsonl"), *FAST
        ),
        input=MANIFEST,
        env=cli_env(tmp_path),
        capture_output=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr.decode()
    assert created(sb) == {g["Name"] for g in GROUPS}


def test_run_from_process_substitution_creates_every_group(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """`worker run <(generate)` in a real shell sends every line the generator wrote."""
    sb = sandbox(sandbox_factory)
    source = tmp_path / "src.jsonl"
    source.write_bytes(MANIFEST)
    command = " ".join(
        worker_cmd(
            "run",
            f"<(cat {source})",
            "--endpoint",
            sb.url,
            "--ledger",
            str(tmp_path / "l.jsonl"),
            *FAST,
        )
    )
    out = subprocess.run(
        ["bash", "-c", command],
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    assert created(sb) == {g["Name"] for g in GROUPS}


def test_dry_run_from_stdin_plans_every_line(tmp_path: Path) -> None:
    """The plan of a piped manifest counts every line as new (it used to count none)."""
    out = subprocess.run(
        worker_cmd("run", "/dev/stdin", "--dry-run", "--ledger", str(tmp_path / "l.jsonl")),
        input=MANIFEST,
        env=cli_env(tmp_path),
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr.decode()
    assert any(
        line.split()[:2] == [str(len(GROUPS)), "new"] for line in out.stdout.decode().splitlines()
    ), out.stdout.decode()


@pytest.mark.parametrize(
    ("what", "reason"),
    [
        ("dir", "is a directory, not a file"),
        ("missing", "no such file"),
        ("socket", "is a socket, not a file"),
        ("zero", "line 1 is longer than 67108864 bytes: this is not a JSONL manifest"),
    ],
)
def test_manifests_that_are_not_files_are_named(tmp_path: Path, what: str, reason: str) -> None:
    """A directory, a missing path, a socket, /dev/zero: exit 2 with the path and the reason."""
    path = {
        "dir": tmp_path,
        "missing": tmp_path / "nope.jsonl",
        "socket": tmp_path / "s.sock",
        "zero": Path("/dev/zero"),
    }[what]
    with socket.socket(socket.AF_UNIX) as listener:
        if what == "socket":
            listener.bind(str(path))
        out = run_worker("validate", str(path), env=cli_env(tmp_path))
    assert_clean_refusal(out)
    assert f"{path}: {reason}" in out.stderr


# -- Names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("char", "code"), [("\u3400", "U+3400"), ("\u9fa6", "U+9FA6"), ("\u9fff", "U+9FFF")]
)
def test_names_the_api_refuses_are_refused_before_sending(
    sandbox_factory: Any, tmp_path: Path, char: str, code: str
) -> None:
    """CJK Extension A and U+9FA6-U+9FFF: exit 2 naming the character and its code point, and
    not one request reaches the sandbox."""
    sb = sandbox(sandbox_factory)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps({"Name": "群组1"}) + "\n" + json.dumps({"Name": f"群组{char}"}) + "\n"
    )
    out = run_worker("run", str(manifest), "--endpoint", sb.url, *FAST, env=cli_env(tmp_path))
    assert_clean_refusal(out)
    assert (
        f"{manifest}:2: Name: may hold only Chinese characters, letters and digits; '{char}' ({code})"
        in out.stderr
    )
    assert sb.state()["arrivals"] == 0


# -- credentials ----------------------------------------------------------------------------


def run_against(
    sb: SandboxProc, tmp_path: Path, env: dict[str, str], *extra: str
) -> subprocess.CompletedProcess[str]:
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(MANIFEST)
    return run_worker("run", str(manifest), "--endpoint", sb.url, *FAST, *extra, env=env)


def test_percent_in_the_credentials_file_signs_and_never_prints(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """A secret with % in ~/.volc/credentials is used as written; it appears nowhere."""
    secret = "p%ss%(home)s%%Zq"
    sb = sandbox(sandbox_factory, keys={AK: secret})
    ini = tmp_path / ".volc" / "credentials"
    ini.parent.mkdir()
    ini.write_text(f"[default]\naccess_key_id = {AK}\nsecret_access_key = {secret}\n")
    out = run_against(sb, tmp_path, no_secrets_env(tmp_path))
    assert out.returncode == 0, out.stderr
    assert created(sb) == {g["Name"] for g in GROUPS}
    assert secret not in out.stderr and secret not in out.stdout


def test_a_secret_with_a_newline_is_refused_naming_the_variable(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """VOLC_SECRETKEY with a trailing CR/LF: exit 2 naming the variable, not its value; no
    request sent."""
    sb = sandbox(sandbox_factory)
    env = cli_env(tmp_path, sk=SK + "\r\n")
    out = run_against(sb, tmp_path, env)
    assert_clean_refusal(out, SK)
    assert "VOLC_SECRETKEY holds a control character" in out.stderr
    assert sb.state()["arrivals"] == 0


def test_volcengine_variables_sign_like_the_ve_cli(sandbox_factory: Any, tmp_path: Path) -> None:
    """VOLCENGINE_ACCESS_KEY/SECRET_KEY alone are enough to run."""
    sb = sandbox(sandbox_factory)
    env = no_secrets_env(tmp_path) | {"VOLCENGINE_ACCESS_KEY": AK, "VOLCENGINE_SECRET_KEY": SK}
    out = run_against(sb, tmp_path, env)
    assert out.returncode == 0, out.stderr
    assert created(sb) == {g["Name"] for g in GROUPS}
    assert SK not in out.stderr


def test_profile_picks_a_ve_cli_profile(sandbox_factory: Any, tmp_path: Path) -> None:
    """--profile prod signs with the ve CLI's profile prod (not the current one, not the
    environment) and says which source it used."""
    sb = sandbox(sandbox_factory)
    config = tmp_path / ".volcengine" / "config.json"
    config.parent.mkdir()
    config.write_text(
        json.dumps(
            {
                "current": "dev",
                "profiles": {
                    "dev": {
                        "name": "dev",
                        "mode": "ak",
                        "access-key": "AKWRONG",
                        "secret-key": "x",
                    },
                    "prod": {
                        "name": "prod",
                        "mode": "ak",
                        "access-key": AK,
                        "secret-key": SK,
                        "region": "cn-north-1",
                    },
                },
            }
        )
    )
    env = cli_env(tmp_path, ak="AKALSOWRONG", sk="y")
    out = run_against(sb, tmp_path, env, "--profile", "prod")
    assert out.returncode == 0, out.stderr
    assert created(sb) == {g["Name"] for g in GROUPS}
    assert "ve profile prod" in out.stderr and SK not in out.stderr


# -- numbers and URLs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--timeout", "nan"),
        ("--timeout", "inf"),
        ("--limiter-timeout", "nan"),
        ("--max-attempts", "99999999999999999999"),
        ("--concurrency", "0"),
        ("--concurrency", "100000"),
        ("--rate", "-0"),
        ("--grace", "-1"),
    ],
)
def test_numbers_out_of_range_are_usage_errors(tmp_path: Path, flag: str, value: str) -> None:
    """Each bad number: exit 2 naming the flag, no traceback, nothing written."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(MANIFEST)
    out = run_worker("run", str(manifest), "--dry-run", flag, value, env=cli_env(tmp_path))
    assert_clean_refusal(out)
    assert f"{flag} must be" in out.stderr


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--rate", "１０"), ("--rate", "1_0"), ("--concurrency", "٣"), ("--max-attempts", "1_000")],
)
def test_numbers_not_in_ascii_digits_are_usage_errors(
    tmp_path: Path, flag: str, value: str
) -> None:
    """Python's int() and float() take other scripts' digits and underscores; a flag does not
    (a typo, most likely an input method left on): exit 2 naming the flag and the value."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(MANIFEST)
    out = run_worker("run", str(manifest), "--dry-run", flag, value, env=cli_env(tmp_path))
    assert_clean_refusal(out)
    assert f"argument {flag}: invalid" in out.stderr and repr(value) in out.stderr


@pytest.mark.parametrize(
    ("endpoint", "reason", "secret"),
    [
        (
            "https://admin:hunter2@live.volcengineapi.com",
            "remove the user:password@ part",
            "hunter2",
        ),
        ("https://tok3nXYZ@live.volcengineapi.com", "remove the user:password@ part", "tok3nXYZ"),
        ("https://h/?token=tok3nXYZ", "give only scheme, host and port", "tok3nXYZ"),
        ("http://127.example.com", "plain http is allowed only to loopback", None),
    ],
)
def test_bad_endpoints_are_refused_without_echoing_secrets(
    tmp_path: Path, endpoint: str, reason: str, secret: str | None
) -> None:
    """A bad --endpoint is a usage error showing the redacted URL only."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(MANIFEST)
    out = run_worker("run", str(manifest), "--endpoint", endpoint, env=cli_env(tmp_path))
    assert_clean_refusal(out, *([secret] if secret else []))
    assert reason in out.stderr
