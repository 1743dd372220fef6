"""THE option table: every long option of run/sync/export, once.

One row says an option's flag (also its job-file key), its kind, where its value goes, its
help and the commands that take it. From the rows come the argparse arguments, the job
file's schema, the WORKER_* variables, the range checks (settings.LIMITS: the bounds' one
home) and docs/configuration.md (`python -m worker.options`). Defaults have one home too:
the field defaults of Settings, Pacing and RetryPolicy (or the row, for a value that goes
nowhere else). Adding an option is one row here and its use where the value goes.

`resolve` merges command line > job file > environment > defaults into typed, frozen values,
and each message names where a bad value came from (`--rate`, `WORKER_RATE`, `job.toml:3:
rate`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from worker import cli_text, jobfile
from worker.jobfile import Kind
from worker.settings import DEFAULT_CAP, LIMITS, Limit, Pacing, RetryPolicy, Settings

SENDING: Final = cli_text.SENDING
Owner = Literal["settings", "pacing", "retry", "options", "sync"]
_OWNERS: Final = {"settings": Settings, "pacing": Pacing, "retry": RetryPolicy}


@dataclass(frozen=True, slots=True, kw_only=True)
class Option:
    """One long option: a flag, a job-file key and a WORKER_* variable."""

    flag: str  # without "--"; also the job-file key
    kind: Kind
    to: str  # "pacing.rate": the owner and the field the value goes to
    help: str
    commands: tuple[str, ...] = SENDING
    default: object = None  # only when no dataclass field or constant holds the default
    default_of: str = ""  # "module:NAME": the constant that holds the default
    default_text: str = ""  # when the default is a rule rather than a value
    hidden: bool = False  # a tuning knob: not in --help nor the docs

    @property
    def owner(self) -> Owner:
        owner = self.to.partition(".")[0]
        assert owner in ("settings", "pacing", "retry", "options", "sync"), self.to
        return owner  # type: ignore[return-value]

    @property
    def field(self) -> str:
        return self.to.partition(".")[2]

    @property
    def env(self) -> str:
        return jobfile.env_var(self.flag)

    @property
    def limit(self) -> Limit | None:
        return LIMITS.get(self.flag)

    def default_value(self) -> object:
        """The default: the owning dataclass's field default, else the row's."""
        cls = _OWNERS.get(self.owner)
        if cls is not None:
            for f in dataclasses.fields(cls):
                if f.name == self.field:
                    if f.default_factory is not dataclasses.MISSING:
                        return f.default_factory()
                    return None if f.default is dataclasses.MISSING else f.default
        if self.default_of:
            module, _, name = self.default_of.partition(":")
            return getattr(importlib.import_module(module), name)
        return self.default

    def described(self) -> str:
        """The help, with the range and the default derived from their homes."""
        default = self.default_text or shown(self.default_value())
        extra = [f"{self.limit}" if self.limit else "", f"default {default}" if default else ""]
        said = "; ".join(e for e in extra if e)
        return f"{self.help} ({said})" if said else self.help


def shown(value: object) -> str:
    if value is None or value is False or value == []:
        return ""
    return f"{value:g}" if isinstance(value, float) else str(value)


OPTIONS: Final[tuple[Option, ...]] = (
    Option(
        flag="ledger",
        kind="path",
        to="settings.ledger",
        help="the result ledger",
        commands=("run", "sync"),
        default_text="MANIFEST's name + .ledger.jsonl, beside it",
    ),
    Option(
        flag="endpoint",
        kind="str",
        to="settings.endpoint",
        help="API endpoint; plain http only to loopback",
    ),
    Option(flag="region", kind="str", to="settings.region", help="signing region"),
    Option(
        flag="profile",
        kind="str",
        to="options.profile",
        help="credentials profile: a `ve` CLI profile or a ~/.volc/credentials section",
    ),
    Option(flag="rate", kind="float", to="pacing.rate", help="the account's limit in requests/s"),
    Option(
        flag="headroom",
        kind="float",
        to="pacing.headroom",
        help="pace this far under --rate",
        hidden=True,
    ),
    Option(
        flag="concurrency",
        kind="int",
        to="settings.concurrency",
        help="cap on requests in flight",
        default_text=f"follows latency, at most {DEFAULT_CAP}",
    ),
    Option(
        flag="max-attempts",
        kind="int",
        to="retry.max_attempts",
        help="sends per item on retryable errors",
    ),
    Option(
        flag="item-deadline",
        kind="float",
        to="retry.item_deadline_s",
        help="seconds one item may take across its attempts",
    ),
    Option(
        flag="timeout", kind="float", to="settings.timeout_s", help="seconds one attempt may take"
    ),
    Option(
        flag="grace",
        kind="float",
        to="settings.grace_s",
        help="seconds requests on the wire may finish after SIGINT/SIGTERM",
    ),
    Option(
        flag="limiter",
        kind="str",
        to="settings.limiter_url",
        help="shared rate budget, redis://HOST:PORT/DB",
        default_text="in-process",
    ),
    Option(
        flag="limiter-timeout",
        kind="float",
        to="settings.limiter_timeout_s",
        help="seconds the shared limiter may stay unreachable",
    ),
    Option(
        flag="skip-invalid",
        kind="bool",
        to="settings.skip_invalid",
        help="record invalid lines as `invalid` and go on with the rest",
        commands=("run", "sync"),
    ),
    Option(
        flag="retry-rejected",
        kind="bool",
        to="options.retry_rejected",
        help="send again the lines rejected before, though unchanged",
        commands=("run",),
    ),
    Option(
        flag="prune",
        kind="bool",
        to="sync.prune",
        help="delete the account's groups that the manifest does not name, inside the scope",
        commands=("sync",),
    ),
    Option(
        flag="scope-project",
        kind="list",
        to="sync.projects",
        help="prune scope: a ProjectName (repeatable)",
        commands=("sync",),
    ),
    Option(
        flag="scope-match",
        kind="str",
        to="sync.match",
        help="prune scope: a regular expression the whole Name must match",
        commands=("sync",),
    ),
    Option(
        flag="replace-conflicts",
        kind="bool",
        to="sync.replace",
        help="delete a group held in another project and create it again in the "
        "manifest's, inside the scope (counted against --max-delete)",
        commands=("sync",),
    ),
    Option(
        flag="max-delete",
        kind="int",
        to="sync.max_delete",
        help="refuse a sync that would delete more than N groups",
        commands=("sync",),
        default_of="worker.plan.reconcile:DEFAULT_MAX_DELETE",
    ),
    Option(
        flag="plan",
        kind="path",
        to="sync.plan",
        help="carry out this saved plan (no MANIFEST): refused, nothing sent, when the "
        "account, the manifest, the target or the options moved since",
        commands=("sync",),
    ),
    Option(
        flag="plan-out",
        kind="path",
        to="sync.plan_out",
        help="with --dry-run: save the plan here (JSON, mode 0600) for `sync --plan`",
        commands=("sync",),
    ),
    Option(
        flag="yes",
        kind="bool",
        to="sync.yes",
        help="answer yes to the question a sync that deletes or replaces asks at a terminal",
        commands=("sync",),
    ),
    Option(
        flag="log-file",
        kind="path",
        to="options.log_file",
        help="also append the log here as JSON lines (every event at info, debug with -v, "
        "whatever -q says), created 0600; the terminal keeps its bar",
    ),
    Option(
        flag="metrics-file",
        kind="path",
        to="options.metrics_file",
        help="write Prometheus metrics here, atomically, during the run and at its end "
        "(node_exporter textfile collector: name it *.prom)",
        commands=("run", "sync"),
    ),
    Option(
        flag="metrics-port",
        kind="int",
        to="options.metrics_port",
        help="serve /metrics on this port while the run lasts",
        commands=("run", "sync"),
    ),
    Option(
        flag="metrics-push",
        kind="str",
        to="options.metrics_push",
        help="push the metrics to this Prometheus Pushgateway, http(s)://HOST[:PORT][/PATH], "
        "while the run lasts and at its end (grouping key job=worker, job_name, command)",
        commands=("run", "sync"),
    ),
    Option(
        flag="metrics-push-interval",
        kind="float",
        to="options.metrics_push_interval_s",
        help="seconds between pushes to --metrics-push while the run lasts",
        commands=("run", "sync"),
        default=15.0,
    ),
    Option(
        flag="metrics-host",
        kind="str",
        to="options.metrics_host",
        help="the address /metrics listens on",
        commands=("run", "sync"),
        default="127.0.0.1",
    ),
)
BY_FLAG: Final = {o.flag: o for o in OPTIONS}


def rows(command: str) -> tuple[Option, ...]:
    return tuple(o for o in OPTIONS if command in o.commands)


def schema(command: str) -> dict[str, jobfile.OptionSpec]:
    """The job file's keys and the WORKER_* variables of `command`: its rows and `manifest`."""
    keys = {o.flag: jobfile.OptionSpec(kind=o.kind) for o in rows(command)}
    if command != "export":
        keys["manifest"] = jobfile.OptionSpec(kind="path")
    return keys


# -- the parser ---------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser, command: str) -> None:
    """`command`'s own arguments: the positional ones, then one per row."""
    if command != "export":
        p.add_argument("manifest", nargs="?", help="JSONL file, one group per line (or from --job)")
        p.add_argument("--job", help="a job file (TOML) naming the manifest and options")
        p.add_argument(
            "--dry-run", action="store_true", help="show the plan; send no write, record nothing"
        )
    for o in rows(command):
        flag, shown = f"--{o.flag}", argparse.SUPPRESS if o.hidden else o.described()
        if o.kind == "bool":
            p.add_argument(flag, action="store_true", default=None, help=shown)
        elif o.kind == "list":
            p.add_argument(flag, action="append", metavar=o.flag.split("-")[-1].upper(), help=shown)
        else:
            kind = {"int": jobfile.integer, "float": jobfile.number}.get(o.kind, str)
            p.add_argument(flag, type=kind, help=shown)
    p.add_argument(
        "--sandbox",
        action="store_true",
        help="run against an embedded sandbox whose account is kept in --sandbox-account "
        "(no cloud account needed)",
    )
    p.add_argument(
        "--sandbox-account",
        help="the embedded sandbox's account file "
        "(default: beside the ledger; export: ./sandbox-account.json)",
    )
    if command == "sync":
        p.add_argument(
            "--check",
            action="store_true",
            help="plan, write nothing; exit 0 when the account matches, 6 when not",
        )
        p.add_argument(
            "--json",
            action="store_true",
            help="with --dry-run/--check: the plan as one JSON object on stdout",
        )
    if command == "export":
        p.add_argument("--project", action="append", help="only this ProjectName (repeatable)")
        p.add_argument("-o", "--output", help="write here (atomically) instead of stdout")


# -- resolving ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandLine:
    """What the command line said: the rows' values given there, by flag, and the rest."""

    command: str
    values: Mapping[str, object]
    manifest: Path | None = None
    job: Path | None = None
    dry_run: bool = False
    json: bool = False
    check: bool = False
    verbose: bool = False  # -v: a sync plan lists its kept extras
    sandbox: bool = False
    sandbox_account: Path | None = None

    @classmethod
    def of(cls, args: argparse.Namespace, command: str) -> CommandLine:
        given = vars(args)

        def path(name: str) -> Path | None:
            return Path(given[name]) if given.get(name) else None

        values = {
            o.flag: given[o.flag.replace("-", "_")]
            for o in rows(command)
            if given.get(o.flag.replace("-", "_")) not in (None, [])
        }
        return cls(
            command=command,
            values=values,
            manifest=path("manifest"),
            job=path("job"),
            dry_run=bool(given.get("dry_run")),
            json=bool(given.get("json")),
            check=bool(given.get("check")),
            verbose=bool(given.get("verbose")),
            sandbox=bool(given.get("sandbox") or given.get("sandbox_account")),
            sandbox_account=path("sandbox_account"),
        )


@dataclass(frozen=True, slots=True)
class Merged:
    """Each option's value and where it came from (`--rate`, `job.toml:3: rate`, WORKER_RATE)."""

    values: dict[str, object]
    origins: dict[str, str]

    def origin(self, flag: str) -> str:
        return self.origins.get(flag) or f"--{flag}"


def merge(line: CommandLine, environ: Mapping[str, str]) -> Merged:
    """Command line > job file > environment; each value with its origin."""
    keys = schema(line.command)
    values = dict(jobfile.env_values(environ, keys))
    origins = {k: jobfile.env_var(k) for k in values}
    if line.job is not None:
        job = jobfile.load(line.job, keys, command=line.command)
        values.update(job.values)
        origins.update({k: job.origin(k) for k in job.values})
    given = dict(line.values)
    if line.manifest is not None:
        given["manifest"] = line.manifest
    values.update(given)
    origins.update({k: "MANIFEST" if k == "manifest" else f"--{k}" for k in given})
    merged = Merged(values, origins)
    for flag, given_value in values.items():  # numbers now, so the message names the origin
        limit = LIMITS.get(flag)
        if limit is not None and isinstance(given_value, int | float):
            limit.check(given_value, merged.origin(flag))
    return merged


def value(merged: Merged, flag: str) -> object:
    """The merged value of `flag`, else its default."""
    return merged.values[flag] if flag in merged.values else BY_FLAG[flag].default_value()
