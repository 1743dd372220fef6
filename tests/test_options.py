"""The option table: every row reaches the parser, the job file, the environment and the docs;
messages point at the fix (did you mean, no abbreviations, where a value came from)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli_env, ledger_records, names, run_worker, write_manifest
from worker import cli, jobfile, options, options_doc, settings

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def _flags(command: str) -> set[str]:
    _, commands = cli._parser(sandbox=False)
    return {s for s in commands[command]._option_string_actions if s.startswith("--")}


def test_every_row_reaches_the_parser_the_job_schema_and_the_environment() -> None:
    """Each row of OPTIONS is a flag, a job key and a WORKER_* variable of its commands, and
    of no other command."""
    for command in ("run", "sync", "export"):
        flags, keys = _flags(command), options.schema(command)
        for o in options.OPTIONS:
            assert (f"--{o.flag}" in flags) == (command in o.commands), (command, o.flag)
            assert (o.flag in keys) == (command in o.commands), (command, o.flag)
        environ = {o.env: "1" for o in options.rows(command)}
        assert set(jobfile.env_values(environ, keys)) == {o.flag for o in options.rows(command)}


def test_an_option_added_in_one_row_is_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new row alone gives a flag, a job key, a variable, a docs line and a merged value."""
    row = options.Option(flag="new-knob", kind="int", to="options.knob", help="a knob", default=3)
    monkeypatch.setattr(options, "OPTIONS", (*options.OPTIONS, row))
    monkeypatch.setattr(options, "BY_FLAG", {**options.BY_FLAG, "new-knob": row})
    assert "--new-knob" in _flags("sync")
    assert options.schema("export")["new-knob"] == jobfile.OptionSpec(kind="int")
    line = options.CommandLine(command="run", values={}, manifest=Path("m.jsonl"))
    merged = options.merge(line, {"WORKER_NEW_KNOB": "7"})
    assert (merged.values["new-knob"], merged.origin("new-knob")) == (7, "WORKER_NEW_KNOB")
    assert options.value(options.merge(line, {}), "new-knob") == 3
    assert "`--new-knob` | `new-knob` | `WORKER_NEW_KNOB` | int | - | 3 |" in options_doc.table()


def test_defaults_come_from_the_settings_dataclasses() -> None:
    """A row's default is its owner's field default: one home, no second copy."""
    from worker.settings import Pacing, RetryPolicy, Settings

    assert options.BY_FLAG["rate"].default_value() == Pacing().rate
    assert options.BY_FLAG["max-attempts"].default_value() == RetryPolicy().max_attempts
    timeout = {f.name: f.default for f in dataclasses.fields(Settings)}["timeout_s"]
    assert options.BY_FLAG["timeout"].default_value() == timeout
    assert f"at most {settings.DEFAULT_CAP}" in options.BY_FLAG["concurrency"].described()


def test_the_committed_configuration_doc_is_current() -> None:
    """docs/configuration.md's option table is the option table today: regenerate it with
    `python -m worker.options_doc` when a row changes (the prose around it is kept)."""
    page = DOCS.read_text(encoding="utf-8")
    assert options_doc.render(page) == page


# -- through the real CLI -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["run", "{M}", "--endpint", "http://127.0.0.1:1"], "did you mean --endpoint?"),
        (["sync", "{M}", "--max-delet", "3"], "did you mean --max-delete?"),
        (["rnu", "{M}"], "did you mean run?"),
    ],
)
def test_a_mistyped_option_or_command_names_the_closest(
    tmp_path: Path, argv: list[str], hint: str
) -> None:
    """A typo is exit 2 with the closest option or command named; nothing is written."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(1))
    out = run_worker(*[str(manifest) if a == "{M}" else a for a in argv], env=cli_env(tmp_path))
    assert out.returncode == 2, out.stderr
    assert hint in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "m.ledger.jsonl").exists()


def test_an_abbreviated_option_is_refused(tmp_path: Path) -> None:
    """`--scope live` is not read as `--scope-project live`: exit 2, before any request."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(1))
    env = cli_env(tmp_path)
    out = run_worker("sync", str(manifest), "--dry-run", "--prune", "--scope", "live", env=env)
    assert out.returncode == 2, out.stderr
    assert "unrecognized arguments: --scope live" in out.stderr
    out = run_worker("run", str(manifest), "--dry-run", "--max-att", "3", env=env)
    assert out.returncode == 2 and "--max-att" in out.stderr


@pytest.mark.parametrize(
    ("command", "own", "foreign"),
    [
        ("validate", "0 no problems", "the account matches the manifest"),
        ("report", "the ledger cannot be read", "WORKER_"),
        ("run", "worker run groups.jsonl", "6 drift"),
        ("sync", "6 drift", "0 no problems"),
    ],
)
def test_each_command_has_its_own_epilog(
    tmp_path: Path, command: str, own: str, foreign: str
) -> None:
    """`COMMAND --help` ends with that command's examples and exit codes, not another's."""
    out = run_worker(command, "--help", env=cli_env(tmp_path))
    assert out.returncode == 0, out.stderr
    assert own in out.stdout and foreign not in out.stdout
    assert "examples:" in out.stdout


@pytest.mark.parametrize("source", ["flag", "env", "job"])
@pytest.mark.parametrize(
    ("flag", "bad", "says"),
    [
        ("rate", "0", "must be in [0.2, 10000], not 0"),
        ("concurrency", "0", "must be in 1..1000, not 0"),
        ("max-delete", "-1", "must be in 0..1000000, not -1"),
    ],
)
def test_a_bad_number_names_where_it_came_from(
    tmp_path: Path, source: str, flag: str, bad: str, says: str
) -> None:
    """A number out of range names its flag, its WORKER_* variable or its job file line,
    once ("must be in", not "must be in range in"); exit 2, nothing written."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(1))
    env: dict[str, Any] = cli_env(tmp_path)
    args = ["sync", str(manifest), "--dry-run"]
    job = tmp_path / "job.toml"
    if source == "flag":
        args, origin = [*args, f"--{flag}", bad], f"--{flag}"
    elif source == "env":
        origin = options.BY_FLAG[flag].env
        env[origin] = bad
    else:
        job.write_text(f'command = "sync"\n\n{flag} = {bad}\n', encoding="utf-8")
        args, origin = [*args, "--job", str(job)], f"{job}:3: {flag}"
    out = run_worker(*args, env=env)
    assert out.returncode == 2, out.stderr
    assert f"error: {origin} {says}" in out.stderr, out.stderr
    assert "in range in" not in out.stderr
    assert not (tmp_path / "m.ledger.jsonl").exists()


def test_the_ledger_header_records_the_concurrency_the_runner_uses(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """Without --concurrency the header says "adaptive, cap 512" (what the runner does), not
    a number the runner never used; with it, the number given."""
    sb = sandbox_factory()
    env = cli_env(tmp_path)
    seen = []
    for stem, extra in (("a", ()), ("b", ("--concurrency", "3"))):
        manifest = write_manifest(tmp_path / f"{stem}.jsonl", names(2, prefix=stem))
        out = run_worker("run", str(manifest), "--endpoint", sb.url, *extra, env=env)
        assert out.returncode == 0, out.stderr
        records = ledger_records(tmp_path / f"{stem}.ledger.jsonl")
        seen += [r["settings"]["concurrency"] for r in records if "settings" in r]
    assert seen == [f"adaptive, cap {settings.DEFAULT_CAP}", 3]
