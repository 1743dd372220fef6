"""Job files and WORKER_* variables: typed values, or errors naming file, key and line."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from worker.errors import UsageError
from worker.jobfile import (
    MAX_BYTES,
    OptionSpec,
    env_values,
    env_var,
    integer,
    load,
    looks_like_credential,
    number,
    unknown_env_vars,
)

# A schema like the CLI's: one option of every kind.
SCHEMA = {
    "manifest": OptionSpec("path"),
    "ledger": OptionSpec("path"),
    "endpoint": OptionSpec("str"),
    "limiter": OptionSpec("str"),
    "rate": OptionSpec("float"),
    "concurrency": OptionSpec("int"),
    "prune": OptionSpec("bool"),
    "scope-project": OptionSpec("list"),
    "max-delete": OptionSpec("int"),
    "metrics-file": OptionSpec("path"),
}


def job(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path, command: str = "sync") -> str:
    with pytest.raises(UsageError) as caught:
        load(path, SCHEMA, command=command)
    return str(caught.value)


def test_every_kind_is_typed_and_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    """Values come back typed by option name; relative paths join the job file's directory."""
    (tmp_path / "jobs").mkdir()
    path = job(
        tmp_path / "jobs",
        """
# the nightly sync
command = "sync"
manifest = "groups.jsonl"
ledger = "/state/groups.ledger.jsonl"
endpoint = "https://live.volcengineapi.com"
rate = 5                      # an integer is a fine float
concurrency = 8
prune = true
"scope-project" = ["live", "直播"]
max-delete = 10
metrics-file = "../metrics/sync.prom"
""",
    )
    loaded = load(path, SCHEMA, command="sync")
    assert loaded.command == "sync" and loaded.path == path
    assert loaded.values == {
        "manifest": tmp_path / "jobs" / "groups.jsonl",
        "ledger": Path("/state/groups.ledger.jsonl"),
        "endpoint": "https://live.volcengineapi.com",
        "rate": 5.0,
        "concurrency": 8,
        "prune": True,
        "scope-project": ["live", "直播"],
        "max-delete": 10,
        "metrics-file": tmp_path / "jobs" / "../metrics/sync.prom",
    }
    assert isinstance(loaded.values["rate"], float)


def test_a_relative_job_path_gives_paths_relative_to_the_working_directory(tmp_path: Path) -> None:
    """`--job jobs/x.toml` from the repository root finds jobs/<manifest>, not ./<manifest>."""
    (tmp_path / "jobs").mkdir()
    job(tmp_path / "jobs", 'command = "run"\nmanifest = "examples/groups.jsonl"\n')
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        loaded = load(Path("jobs/job.toml"), SCHEMA, command="run")
    finally:
        os.chdir(cwd)
    assert loaded.values["manifest"] == Path("jobs/examples/groups.jsonl")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('command = "sync"\n\nrate = "fast"\n', "job.toml:3: rate: must be a number, not a string"),
        (
            'command = "sync"\nconcurrency = 2.5\n',
            "job.toml:2: concurrency: must be an integer, not a number",
        ),
        (
            'command = "sync"\nconcurrency = true\n',
            "job.toml:2: concurrency: must be an integer, not a boolean",
        ),
        ('command = "sync"\nrate = true\n', "job.toml:2: rate: must be a number, not a boolean"),
        ('command = "sync"\nrate = inf\n', "job.toml:2: rate: must be a finite number, not inf"),
        (
            'command = "sync"\nprune = "yes"\n',
            "job.toml:2: prune: must be true or false, not a string",
        ),
        (
            'command = "sync"\nscope-project = "live"\n',
            'job.toml:2: scope-project: must be a list of strings, not a string (write scope-project = ["live"])',
        ),
        (
            'command = "sync"\nscope-project = [1]\n',
            "job.toml:2: scope-project: must be a list of strings, not an array",
        ),
        (
            'command = "sync"\nmanifest = ""\n',
            "job.toml:2: manifest: must be a path (a string), not a string",
        ),
        (
            'command = "sync"\nmanifest = 1979-05-27\n',
            "job.toml:2: manifest: must be a path (a string), not a date or time",
        ),
        (
            'command = "sync"\n# rate = 1\nrat = 1\n',
            "job.toml:3: rat: unknown key (did you mean rate?)",
        ),
        (
            'command = "sync"\nmax_delete = 3\n',
            "job.toml:2: max_delete: unknown key (options are spelled with '-': max-delete)",
        ),
        (
            'command = "sync"\n\n[limits]\nrate = 3\n',
            "job.toml:3: limits: unknown key (did you mean limiter?)",
        ),
        ('command = "sync"\n"quoted key" = 1\n', "job.toml:2: quoted key: unknown key"),
    ],
)
def test_wrong_types_and_unknown_keys_name_file_key_and_line(
    tmp_path: Path, text: str, expected: str
) -> None:
    """Every refused value names FILE:LINE: KEY and what was expected."""
    message = error_of(job(tmp_path, text))
    assert message == f"{tmp_path}/{expected}"


def test_line_numbers_skip_multiline_strings(tmp_path: Path) -> None:
    """A key written inside a multi-line string value is not taken for the key itself."""
    text = 'command = "sync"\nendpoint = """\nrate = 1\n"""\nrate = "x"\n'
    assert error_of(job(tmp_path, text)).startswith(f"{tmp_path}/job.toml:5: rate:")


def test_command_must_be_the_one_invoked(tmp_path: Path) -> None:
    """A sync job given to `run` is refused, with the command that would run it."""
    path = job(tmp_path, '# header\ncommand = "sync"\n')
    assert error_of(path, command="run") == (
        f"{path}:2: command: this job is for 'sync', not 'run'; run it with `worker sync --job {path}`"
    )


def test_command_is_required_and_a_string(tmp_path: Path) -> None:
    """A job file that does not say its command, or says it with a non-string, is refused."""
    assert error_of(job(tmp_path, "rate = 1\n")).endswith(
        'command: missing; say which command this job is for (command = "sync")'
    )
    assert (
        error_of(job(tmp_path, "command = 1\n"))
        == f"{tmp_path}/job.toml:1: command: must be a string"
    )


@pytest.mark.parametrize(
    "key",
    [
        "ak",
        "sk",
        "AK",
        "secret",
        "secret_key",
        "Secret-Key",
        "access-key",
        "ACCESS_KEY",
        "accesskey",
        "session_token",
        "token",
        "password",
        "redis-password",
        "credentials",
    ],
)
def test_keys_that_look_like_credentials_are_refused(tmp_path: Path, key: str) -> None:
    """Credentials never go in a job file: the key is refused before anything else is read."""
    message = error_of(job(tmp_path, f'command = "run"\n{key} = "AKLT..."\n'))
    assert message.startswith(f"{tmp_path}/job.toml:2: {key}: looks like a credential")
    assert "AKLT" not in message  # the value is never echoed


def test_credentials_inside_a_table_are_refused_too(tmp_path: Path) -> None:
    """A [credentials] table with access_key inside is refused as credentials, not as unknown."""
    path = job(tmp_path, 'command = "sync"\n[volc]\naccess_key_id = "x"\n')
    assert error_of(path) == (
        f"{path}:3: access_key_id: looks like a credential; credentials "
        "never go in a job file (use the environment, ~/.volc or --profile)"
    )


@pytest.mark.parametrize(
    "key", ["rate", "max-delete", "limiter-timeout", "task", "scope-project", "profile"]
)
def test_ordinary_option_names_do_not_look_like_credentials(key: str) -> None:
    """No real option name is taken for a credential."""
    assert not looks_like_credential(key)


def test_a_url_with_a_password_is_refused(tmp_path: Path) -> None:
    """A limiter URL with a password belongs in WORKER_LIMITER, not in a file in git."""
    path = job(tmp_path, 'command = "run"\nlimiter = "redis://:hunter2@redis:6379/0"\n')
    message = error_of(path, command="run")
    assert message.startswith(f"{path}:2: limiter: holds a password in a URL")
    assert "WORKER_LIMITER" in message and "hunter2" not in message
    ok = job(tmp_path, 'command = "run"\nlimiter = "redis://redis:6379/0"\n', name="ok.toml")
    assert load(ok, SCHEMA, command="run").values["limiter"] == "redis://redis:6379/0"


def test_toml_syntax_errors_name_file_and_line(tmp_path: Path) -> None:
    """A TOML syntax error says the file and the line, as every other job file error does."""
    message = error_of(job(tmp_path, 'command = "sync"\nrate = = 3\n'))
    assert message.startswith(f"{tmp_path}/job.toml:2: not valid TOML:")
    message = error_of(job(tmp_path, 'command = "sync"\nrate = 1\nrate = 2\n'))
    assert message.startswith(f"{tmp_path}/job.toml:3: not valid TOML:")


def test_bad_bytes_missing_files_and_non_files_are_refused(tmp_path: Path) -> None:
    """Invalid UTF-8 (with its line), a missing file, a directory, a FIFO, an oversized file."""
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'command = "sync"\nendpoint = "\xff"\n')
    assert error_of(bad) == f"{bad}:2: not valid UTF-8"
    assert error_of(tmp_path / "none.toml").startswith(
        f"{tmp_path}/none.toml: cannot open the job file:"
    )
    assert error_of(tmp_path) == f"{tmp_path}: not a regular file"
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    assert error_of(fifo) == f"{fifo}: not a regular file"  # and did not wait for a writer
    big = job(tmp_path, 'command = "sync"\n' + "#" * MAX_BYTES + "\n", name="big.toml")
    assert error_of(big) == f"{big}: larger than {MAX_BYTES} bytes; not a job file"


def test_a_symlinked_job_file_is_read(tmp_path: Path) -> None:
    """ConfigMap mounts are symlinks: they are followed, and paths are relative to the link."""
    (tmp_path / "real").mkdir()
    job(tmp_path / "real", 'command = "sync"\nmanifest = "groups.jsonl"\n')
    (tmp_path / "job.toml").symlink_to(tmp_path / "real" / "job.toml")
    loaded = load(tmp_path / "job.toml", SCHEMA, command="sync")
    assert loaded.values["manifest"] == tmp_path / "groups.jsonl"


def test_env_var_names() -> None:
    """Every option's variable is WORKER_ + its name in capitals with - as _."""
    assert [env_var(n) for n in ("rate", "scope-project", "metrics-file")] == [
        "WORKER_RATE",
        "WORKER_SCOPE_PROJECT",
        "WORKER_METRICS_FILE",
    ]


def test_env_values_are_typed() -> None:
    """Numbers, booleans in their usual spellings, comma lists; empty means unset."""
    env = {
        "WORKER_RATE": "2.5",
        "WORKER_CONCURRENCY": " 8 ",
        "WORKER_PRUNE": "TRUE",
        "WORKER_SCOPE_PROJECT": "live, 直播,,",
        "WORKER_LEDGER": "state/l.jsonl",
        "WORKER_ENDPOINT": "",
        "WORKER_LIMITER": "redis://r:6379/0",
        "PATH": "/bin",
    }
    assert env_values(env, SCHEMA) == {
        "rate": 2.5,
        "concurrency": 8,
        "prune": True,
        "scope-project": ["live", "直播"],
        "ledger": Path("state/l.jsonl"),
        "limiter": "redis://r:6379/0",
    }
    for word, value in [
        ("1", True),
        ("yes", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
    ]:
        assert env_values({"WORKER_PRUNE": word}, SCHEMA) == {"prune": value}


@pytest.mark.parametrize(
    ("var", "raw", "expected"),
    [
        ("WORKER_RATE", "fast", "WORKER_RATE='fast': must be a number"),
        ("WORKER_RATE", "nan", "WORKER_RATE='nan': must be a finite number"),
        ("WORKER_CONCURRENCY", "2.5", "WORKER_CONCURRENCY='2.5': must be an integer"),
        # Python's int() and float() take these; a person typing a number does not mean them
        ("WORKER_RATE", "１０", "WORKER_RATE='１０': must be a number"),
        ("WORKER_RATE", "1_0", "WORKER_RATE='1_0': must be a number"),
        ("WORKER_CONCURRENCY", "٣", "WORKER_CONCURRENCY='٣': must be an integer"),
        ("WORKER_CONCURRENCY", "1_000", "WORKER_CONCURRENCY='1_000': must be an integer"),
        (
            "WORKER_PRUNE",
            "maybe",
            "WORKER_PRUNE='maybe': must be 1/0, true/false, yes/no or on/off",
        ),
    ],
)
def test_env_errors_name_the_variable(var: str, raw: str, expected: str) -> None:
    """A bad value is refused with the variable's name and its value."""
    with pytest.raises(UsageError) as caught:
        env_values({var: raw}, SCHEMA)
    assert str(caught.value) == expected


def test_unknown_env_vars_are_found_for_a_warning() -> None:
    """A typo in a WORKER_ variable is reported; other variables (test hooks too) are not."""
    env = {"WORKER_RAET": "3", "WORKER_RATE": "3", "TESTHOOK_CLOCK_OFFSET_S": "5", "HOME": "/"}
    assert unknown_env_vars(env, SCHEMA) == ["WORKER_RAET"]


@pytest.mark.parametrize(
    ("text", "whole", "value"),
    [("10", True, 10), (" 7 ", True, 7), ("-3", True, -3), ("2.5", False, 2.5),
     (".5", False, 0.5), ("1e1", False, 10.0), ("5.", False, 5.0)],
)  # fmt: skip
def test_numbers_in_ascii_digits_are_numbers(text: str, whole: bool, value: float) -> None:
    assert (integer if whole else number)(text) == value


@pytest.mark.parametrize("text", ["１０", "٣", "1_0", "", "1e", "0x10", "+", "1 0"])
def test_anything_else_is_not_a_number(text: str) -> None:
    for parse in (integer, number):
        with pytest.raises(ValueError):
            parse(text)


def test_nan_and_inf_reach_the_range_check_which_names_them() -> None:
    assert math.isnan(number("nan")) and number("-Inf") == -math.inf
    with pytest.raises(ValueError):
        integer("inf")
