"""Job files and WORKER_* environment variables: the options of a scheduled run, typed.

A job is a TOML file that names the command it is for (`command = "run"` or `"sync"`), the
manifest, and any long option by its own name (`rate = 5`, `scope-project = ["live"]`). The
CLI describes its options once, as a schema (name -> OptionSpec); this module turns a job
file, or the environment, into values of those kinds, and refuses everything else with a
message naming the file, the key and its line (or the variable). Merging is the CLI's:
command line > job file > environment > defaults.

Credentials never go in a job file: a key that looks like one is refused, and so is a URL
that carries a password (a limiter URL with one belongs in WORKER_LIMITER).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import stat
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from worker.errors import UsageError
from worker.urls import secret_in_url

Kind = Literal["str", "path", "int", "float", "bool", "list"]

MAX_BYTES = 1 << 20  # a job file is a few hundred bytes; anything near this is not one
ENV_PREFIX = "WORKER_"

# Words that make a key look like a credential, compared after lower-casing and turning `_`
# into `-`: a whole word among the key's words (`ak`, `sk`, `token`), or anywhere in it.
_CREDENTIAL_WORDS = frozenset({"ak", "sk", "token", "password", "passwd", "pwd", "secret"})
_CREDENTIAL_PARTS = (
    "secret",
    "password",
    "passwd",
    "access-key",
    "accesskey",
    "session-token",
    "credential",
    "token",
)

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

_KIND_TEXT: dict[Kind, str] = {
    "str": "a string",
    "path": "a path (a string)",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "list": "a list of strings",
}


@dataclass(frozen=True, slots=True)
class OptionSpec:
    """How one option's value is typed in a job file and in its environment variable."""

    kind: Kind


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    """A loaded job file: the command it is for and its options' values by option name
    (`"scope-project"`, not `scope_project`). Path values are already relative to the file."""

    command: str
    values: dict[str, object]
    path: Path
    lines: dict[str, int] = field(default_factory=dict)  # where each key is written (0: unknown)

    def origin(self, key: str) -> str:
        """`job.toml:3: rate`: where a value came from, for a message."""
        line = self.lines.get(key, 0)
        return f"{self.path}:{line}: {key}" if line else f"{self.path}: {key}"


def env_var(name: str) -> str:
    """The environment variable of an option: `scope-project` -> `WORKER_SCOPE_PROJECT`."""
    return ENV_PREFIX + name.upper().replace("-", "_")


def looks_like_credential(key: str) -> bool:
    """True for keys such as `ak`, `secret_key`, `Access-Key`, `session_token`, `password`."""
    norm = key.lower().replace("_", "-")
    return bool(_CREDENTIAL_WORDS.intersection(norm.split("-"))) or any(
        part in norm for part in _CREDENTIAL_PARTS
    )


# -- job files ---------------------------------------------------------------------------


def load(path: Path, schema: Mapping[str, OptionSpec], *, command: str) -> Job:
    """Read the job file at `path` for `command`; raise UsageError naming file, key and line."""
    text = _read_text(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # Python 3.11's message ends "(at line L, column C)"; lead with the line like the rest.
        msg = str(exc)
        found = re.search(r"\(at line (\d+), column \d+\)$", msg)
        where = f"{path}:{found.group(1)}" if found else str(path)
        raise UsageError(f"{where}: not valid TOML: {msg}") from None

    lines = text.splitlines()
    for key, value in data.items():  # credentials first: the strongest reason to refuse
        for name in _keys_in(key, value):
            if looks_like_credential(name):
                raise UsageError(
                    f"{_at(path, lines, name)}: {name}: looks like a credential; credentials "
                    "never go in a job file (use the environment, ~/.volc or --profile)"
                )

    if "command" not in data:
        raise UsageError(
            f'{path}: command: missing; say which command this job is for (command = "{command}")'
        )
    job_command = data.pop("command")
    if not isinstance(job_command, str):
        raise UsageError(f"{_at(path, lines, 'command')}: command: must be a string")
    if job_command != command:
        raise UsageError(
            f"{_at(path, lines, 'command')}: command: this job is for "
            f"{job_command!r}, not {command!r}; "
            f"run it with `worker {job_command} --job {path}`"
        )

    values: dict[str, object] = {}
    for key, value in data.items():
        where = _at(path, lines, key)
        spec = schema.get(key)
        if spec is None:
            raise UsageError(f"{where}: {key}: unknown key{_suggest(key, schema)}")
        values[key] = _typed(value, spec.kind, base=path.parent, key=key, where=where)
    at = {key: _line_of(lines, key) for key in values}
    return Job(command=command, values=values, path=path, lines=at)


def _read_text(path: Path) -> str:
    """The file's text: a regular file (symlinks followed: ConfigMap mounts are symlinks),
    at most MAX_BYTES, UTF-8."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer before fstat can refuse it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise UsageError(f"{path}: cannot open the job file: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"{path}: not a regular file")
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise UsageError(f"{path}: larger than {MAX_BYTES} bytes; not a job file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UsageError(f"{path}:{line}: not valid UTF-8") from None


def _keys_in(key: str, value: object) -> Iterator[str]:
    """`key` and, inside tables and arrays of tables, every key under it."""
    yield key
    tables = (
        [value]
        if isinstance(value, dict)
        else ([v for v in value if isinstance(v, dict)] if isinstance(value, list) else [])
    )
    for table in tables:
        for k, v in table.items():
            yield from _keys_in(k, v)


def _typed(value: object, kind: Kind, *, base: Path, key: str, where: str) -> object:
    def wrong() -> UsageError:
        return UsageError(f"{where}: {key}: must be {_KIND_TEXT[kind]}, not {_toml_type(value)}")

    match kind:
        case "str":
            if not isinstance(value, str):
                raise wrong()
            _refuse_url_password(value, f"{where}: {key}", env_var(key))
            return value
        case "path":
            if not isinstance(value, str) or not value:
                raise wrong()
            return base / value  # an absolute value stays as it is (Path's `/` rule)
        case "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise wrong()
            return value
        case "float":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise wrong()
            if not math.isfinite(value):
                raise UsageError(f"{where}: {key}: must be a finite number, not {value}")
            return float(value)
        case "bool":
            if not isinstance(value, bool):
                raise wrong()
            return value
        case "list":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                hint = f' (write {key} = ["{value}"])' if isinstance(value, str) else ""
                raise UsageError(f"{wrong()!s}{hint}")
            return list(value)


def _at(path: Path, lines: list[str], key: str) -> str:
    """`FILE:LINE` for the line where `key` is written, or `FILE` if it cannot be found."""
    line = _line_of(lines, key)
    return f"{path}:{line}" if line else str(path)


def _line_of(lines: list[str], key: str) -> int:
    """The 1-based line where `key` is written as a key or a table name; 0 if not found.

    tomllib gives no positions, so this scans the text: a key is the start of a line
    (bare, "quoted" or 'quoted', maybe dotted) before `=`, or a part of a [table] header.
    Lines inside multi-line strings are skipped, so a value's text cannot match.
    """
    k = re.escape(key)
    name = rf"""(?:{k}|"{k}"|'{k}')"""
    assign = re.compile(rf"""^\s*(?:[^=\[]*\.\s*)?{name}\s*(?:=|\.)""")
    header = re.compile(rf"""^\s*\[\[?\s*(?:[^\]]*\.\s*)?{name}\s*(?:\]|\.)""")
    closing: str | None = None  # the delimiter of the multi-line string we are in
    for number, text in enumerate(lines, start=1):
        if closing is not None:
            if text.count(closing) % 2 == 1:
                closing = None
            continue
        if assign.match(text) or header.match(text):
            return number
        for delim in ('"""', "'''"):
            if text.count(delim) % 2 == 1:
                closing = delim
                break
    return 0


def _suggest(key: str, schema: Mapping[str, OptionSpec]) -> str:
    spelled = key.replace("_", "-")
    if spelled in schema:
        return f" (options are spelled with '-': {spelled})"
    close = difflib.get_close_matches(key, list(schema), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _toml_type(value: object) -> str:
    match value:
        case bool():
            return "a boolean"
        case int() | float():
            return "a number"
        case str():
            return "a string"
        case list():
            return "an array"
        case dict():
            return "a table"
        case _:
            return "a date or time"


def _refuse_url_password(value: str, where: str, var: str) -> None:
    # A job file is committed and shared; a URL's password (userinfo or ?password=) is not.
    what = secret_in_url(value) if "://" in value else None
    if what is not None:
        raise UsageError(
            f"{where}: holds a password in a URL ({what}); put the URL in the "
            f"environment ({var}) instead of the job file"
        )


# -- environment ---------------------------------------------------------------------------


def env_values(env: Mapping[str, str], schema: Mapping[str, OptionSpec]) -> dict[str, object]:
    """Values of the options whose WORKER_* variable is set and not empty, by option name.

    Kinds: str as is; path relative to the working directory; int; float (finite); bool as
    1/0, true/false, yes/no, on/off; list comma-separated (blanks dropped).
    """
    values: dict[str, object] = {}
    for name, spec in schema.items():
        var = env_var(name)
        raw = env.get(var, "")
        if not raw.strip():
            continue  # `X=` in a unit or compose file means "not set", not "empty value"
        values[name] = _from_env(raw.strip(), spec.kind, var)
    return values


def unknown_env_vars(env: Mapping[str, str], schema: Mapping[str, OptionSpec]) -> list[str]:
    """WORKER_* variables that name no option (typos such as WORKER_RAET), sorted: for a
    warning, since the environment is shared with everything else the process runs."""
    known = {env_var(name) for name in schema}
    return sorted(v for v in env if v.startswith(ENV_PREFIX) and v not in known)


# Numbers as a person types them in ASCII: Python's int() and float() also take other
# scripts' digits ("１０", "٣"), underscores ("1_0") and words ("inf", "nan"), which in a
# flag or a variable are typos, not numbers.
_INTEGER = re.compile(r"[+-]?[0-9]+")
# "nan" and "inf" pass here so that the range check can say what is wrong with them.
_NUMBER = re.compile(
    r"[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|nan|inf|infinity)", re.I
)


def integer(text: str) -> int:
    """A whole number in ASCII digits (argparse's `type=` for whole-number flags)."""
    if not _INTEGER.fullmatch(text.strip()):
        raise ValueError(text)
    return int(text)


def number(text: str) -> float:
    """A decimal number in ASCII digits, or nan/inf for the range check to refuse by name
    (argparse's `type=` for the other numeric flags)."""
    if not _NUMBER.fullmatch(text.strip()):
        raise ValueError(text)
    return float(text)


def _from_env(raw: str, kind: Kind, var: str) -> object:
    match kind:
        case "str":
            return raw
        case "path":
            return Path(raw)
        case "int":
            try:
                return integer(raw)
            except ValueError:
                raise UsageError(f"{var}={raw!r}: must be an integer") from None
        case "float":
            try:
                value = number(raw)
            except ValueError:
                raise UsageError(f"{var}={raw!r}: must be a number") from None
            if not math.isfinite(value):
                raise UsageError(f"{var}={raw!r}: must be a finite number")
            return value
        case "bool":
            word = raw.lower()
            if word in _TRUE:
                return True
            if word in _FALSE:
                return False
            raise UsageError(f"{var}={raw!r}: must be 1/0, true/false, yes/no or on/off")
        case "list":
            return [part.strip() for part in raw.split(",") if part.strip()]
