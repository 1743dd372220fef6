"""Command line: arguments in, exit codes out; the only module that knows it is a process.

Arguments are merged (command line > job file > environment > the defaults in Settings),
signals are handled from the first instruction to the last, and every WorkerError becomes a
message and the exit code its class carries (errors.py). Anything else is a bug: its
traceback is printed and the exit code is 70.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import traceback
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import structlog

from worker import __version__, logs
from worker.errors import Exit, LedgerLocked, ManifestError, UsageError, WorkerError
from worker.records import StopReason
from worker.signals import SIGNALS, Interrupted, install_early
from worker.userpaths import Named, check_path, check_paths

if TYPE_CHECKING:  # the runner (and aiohttp) load only for the commands that send
    from worker.runner import Controls

log = structlog.get_logger("worker")
Kind = Literal["str", "path", "int", "float", "bool", "list"]


def main(argv: Sequence[str] | None = None) -> NoReturn:
    sys.exit(run_cli(argv))


def run_cli(argv: Sequence[str] | None = None) -> int:
    install_early()  # first: a signal during start-up is an orderly exit 4
    logs.guard_stdio()
    try:
        words = list(sys.argv[1:] if argv is None else argv)
        args = _parser(sandbox="sandbox" in words).parse_args(words)
        tty = sys.stderr.isatty()
        fmt = args.log_format if args.log_format != "auto" else ("console" if tty else "json")
        level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
        logs.configure(json=fmt == "json", level=level)
        code: int = args.command(args)
        return code
    except ManifestError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        if exc.total > len(exc.problems):
            print(f"... and {exc.total - len(exc.problems)} more problem(s)", file=sys.stderr)
        print(f"error: the manifest has {exc.total} problem(s); nothing was sent", file=sys.stderr)
        return exc.exit_code
    except LedgerLocked as exc:
        print(f"error: {exc}; nothing was changed", file=sys.stderr)
        return exc.exit_code
    except WorkerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Interrupted:
        print("interrupted before anything was sent; nothing was changed", file=sys.stderr)
        return Exit.INTERRUPTED
    except Exception:
        traceback.print_exc(file=sys.stderr)
        print(
            "error: internal error (a bug in worker; the ledger is consistent): please "
            "report it with the traceback above",
            file=sys.stderr,
        )
        return Exit.INTERNAL


# -- signals ------------------------------------------------------------------------------


def loop_under_signals(grace_s: float) -> Any:
    """The `Loop` for compose: run a coroutine with SIGINT/SIGTERM handled in the loop.

    The first signal drains the run (no new requests; those on the wire may finish for
    `grace_s`), then cancels it; a second signal cancels it at once. A signal that arrives
    before any write request went out cancels at once: there is nothing to wait for."""

    def run(main: Coroutine[Any, Any, Exit], controls: Controls) -> Exit:
        async def guarded() -> Exit:
            loop = asyncio.get_running_loop()
            task = asyncio.current_task()
            assert task is not None
            seen = 0

            def on_signal(signum: int) -> None:
                nonlocal seen
                seen += 1
                name = signal.Signals(signum).name
                if seen == 1 and controls.writes_started:
                    log.warning(
                        "run.stopping",
                        signal=name,
                        grace_s=grace_s,
                        hint="requests on the wire may finish; signal again to stop at once",
                    )
                    controls.drain(StopReason.SIGNAL)
                    loop.call_later(grace_s, task.cancel)
                else:
                    log.warning("run.stopping_now", signal=name)
                    controls.drain(StopReason.SIGNAL)
                    task.cancel()

            for sig in SIGNALS:
                loop.add_signal_handler(sig, on_signal, sig)
            try:
                return await main
            except asyncio.CancelledError:
                return Exit.INTERRUPTED
            finally:
                for sig in SIGNALS:
                    loop.remove_signal_handler(sig)
                install_early()  # asyncio restored the defaults: ours again

        code = asyncio.run(guarded())
        if code is Exit.INTERRUPTED:
            print("stopped; run the same command again to resume", file=sys.stderr)
        return code

    return run


# -- commands -----------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from worker.commands import run as run_command
    from worker.runner import Controls

    settings, options = _resolve(args, "run")
    controls = Controls()
    return run_command.run(
        settings, options, controls, loop_under_signals(settings.grace_s), sys.stdout
    )


def cmd_sync(args: argparse.Namespace) -> int:
    from worker.commands import sync as sync_command
    from worker.runner import Controls

    if args.json and not (args.dry_run or args.check):
        raise UsageError("--json prints a plan: give it with --dry-run or --check")
    settings, options = _resolve(args, "sync")
    controls = Controls()
    return sync_command.sync(
        settings,
        options,
        _sync_options(args),
        controls,
        loop_under_signals(settings.grace_s),
        sys.stdout,
    )


def cmd_export(args: argparse.Namespace) -> int:
    from worker.commands import export as export_command
    from worker.runner import Controls

    if args.output:
        check_path(Path(args.output), "-o")
    settings, options = _resolve(args, "export")
    controls = Controls()
    projects = frozenset(args.project or ())
    return export_command.export(
        settings,
        options,
        projects,
        Path(args.output) if args.output else None,
        controls,
        loop_under_signals(settings.grace_s),
        sys.stdout,
    )


def cmd_validate(args: argparse.Namespace) -> int:
    from worker import manifest

    check_path(Path(args.manifest), "MANIFEST")
    with manifest.scan(Path(args.manifest)) as scan:
        if scan.problem_count:
            raise ManifestError(scan.problems, scan.problem_count)
        print(f"{args.manifest}: {scan.groups} group(s), no problems")
    return Exit.OK


def cmd_report(args: argparse.Namespace) -> int:
    from worker import report

    check_path(Path(args.ledger), "LEDGER")
    if args.manifest:
        check_path(Path(args.manifest), "--manifest")
    return report.main(
        Path(args.ledger),
        manifest=Path(args.manifest) if args.manifest else None,
        json=args.json,
        failed=args.failed,
        out=sys.stdout,
        err=sys.stderr,
    )


# -- options ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Opt:
    """One long option of run/sync/export: also a job-file key and a WORKER_* variable."""

    name: str  # as on the command line without "--", and as a job-file key
    kind: Kind
    help: str
    commands: tuple[str, ...] = ("run", "sync", "export")


OPTIONS: tuple[Opt, ...] = (
    Opt(
        "ledger",
        "path",
        "the result ledger (default: MANIFEST's name + .ledger.jsonl)",
        ("run", "sync"),
    ),
    Opt(
        "endpoint",
        "str",
        "API endpoint (default https://live.volcengineapi.com); plain http only to loopback",
    ),
    Opt("region", "str", "signing region (default cn-north-1)"),
    Opt(
        "profile", "str", "credentials profile: a `ve` CLI profile or a ~/.volc/credentials section"
    ),
    Opt("rate", "float", "the account's limit in requests/s (default 10, the documented one)"),
    Opt(
        "concurrency",
        "int",
        "cap on requests in flight, 1-1000 (default: follows latency, at most 512)",
    ),
    Opt("max-attempts", "int", "sends per item on retryable errors, 1-100 (default 8)"),
    Opt("item-deadline", "float", "seconds one item may take across its attempts (default 300)"),
    Opt("timeout", "float", "seconds one attempt may take, (0, 600] (default 15)"),
    Opt(
        "grace",
        "float",
        "seconds requests on the wire may finish after SIGINT/SIGTERM (default 10)",
    ),
    Opt("limiter", "str", "shared rate budget, redis://HOST:PORT/DB (default: in-process)"),
    Opt("limiter-timeout", "float", "seconds the shared limiter may stay unreachable (default 60)"),
    Opt(
        "skip-invalid",
        "bool",
        "record invalid lines as `invalid` and go on with the rest",
        ("run", "sync"),
    ),
    Opt(
        "retry-rejected", "bool", "send again the lines rejected before, though unchanged", ("run",)
    ),
    Opt(
        "prune",
        "bool",
        "delete the account's groups that the manifest does not name, inside the scope",
        ("sync",),
    ),
    Opt("scope-project", "list", "prune scope: a ProjectName (repeatable)", ("sync",)),
    Opt(
        "scope-match",
        "str",
        "prune scope: a regular expression the whole Name must match",
        ("sync",),
    ),
    Opt(
        "max-delete",
        "int",
        "refuse a sync that would delete more than N groups (default 50)",
        ("sync",),
    ),
    Opt(
        "metrics-file",
        "path",
        "write Prometheus metrics here, atomically, during the run "
        "and at its end (node_exporter textfile collector: name it *.prom)",
        ("run", "sync"),
    ),
    Opt("metrics-port", "int", "serve /metrics on this port while the run lasts", ("run", "sync")),
    Opt(
        "metrics-host",
        "str",
        "the address /metrics listens on (default 127.0.0.1)",
        ("run", "sync"),
    ),
)


def _resolve(args: argparse.Namespace, command: str) -> tuple[Any, Any]:
    """Settings and compose.Options from the command line, the job file, the environment."""
    from worker import compose
    from worker.settings import Pacing, RetryPolicy, Settings, check_endpoint, check_limiter

    values = _merged(args, command)
    sandbox = bool(args.sandbox or args.sandbox_account)
    manifest = values.get("manifest")
    if command != "export" and manifest is None:
        raise UsageError(f"{command}: give a MANIFEST (or a job file naming one)")
    manifest_path = Path(str(manifest)) if manifest is not None else Path("export.jsonl")
    if manifest is not None:
        check_path(manifest_path, lambda: _origin(args, "manifest"))
    ledger_path = values.get("ledger")
    if (
        ledger_path is None
        and command != "export"
        and manifest_path.exists()
        and not manifest_path.is_file()
        and not manifest_path.is_dir()
    ):
        raise UsageError(
            f"{manifest_path} is not a regular file (a pipe?): give --ledger, "
            "since no default ledger can go beside it"
        )
    ledger_named: Named = lambda: _origin(args, "ledger")  # noqa: E731
    if ledger_path is None:
        ledger_path = compose.default_ledger(manifest_path, sandbox=sandbox)
        ledger_named = f"the default ledger (beside {_origin(args, 'manifest')})"
    if command != "export":  # the ledger and the files kept beside it (ledger.py, compose.py)
        ledger_file = Path(str(ledger_path))
        check_paths(
            (ledger_file.with_name(ledger_file.name + suffix), ledger_named)
            for suffix in ("", ".lock", ".index", ".spool")
        )
    account = None
    if sandbox:
        account = (
            Path(args.sandbox_account)
            if args.sandbox_account
            else (
                Path("sandbox-account.json")
                if command == "export"
                else compose.sandbox_account_for(Path(str(ledger_path)))
            )
        )
        check_path(account, "--sandbox-account")
    pacing: dict[str, Any] = {
        k: values[o]
        for k, o in (("rate", "rate"), ("headroom", "headroom"))
        if values.get(o) is not None
    }
    retry: dict[str, Any] = {
        k: values[o]
        for k, o in (("max_attempts", "max-attempts"), ("item_deadline_s", "item-deadline"))
        if values.get(o) is not None
    }
    plain = {
        "endpoint": "endpoint",
        "region": "region",
        "concurrency": "concurrency",
        "timeout_s": "timeout",
        "grace_s": "grace",
        "limiter_url": "limiter",
        "limiter_timeout_s": "limiter-timeout",
        "skip_invalid": "skip-invalid",
    }
    kwargs: dict[str, Any] = {k: values[o] for k, o in plain.items() if values.get(o) is not None}
    # Checked here first so that the message names where a bad URL came from; Settings
    # checks again (it is also built by tests and benchmarks), naming the flag.
    if "endpoint" in kwargs:
        check_endpoint(str(kwargs["endpoint"]), _origin(args, "endpoint"))
    if "limiter_url" in kwargs:
        check_limiter(str(kwargs["limiter_url"]), _origin(args, "limiter"))
    settings = Settings(
        manifest=manifest_path,
        ledger=Path(str(ledger_path)),
        pacing=Pacing(**pacing),
        retry=RetryPolicy(**retry),
        dry_run=bool(getattr(args, "dry_run", False)),
        **kwargs,
    )
    job = getattr(args, "job", None)
    port = values.get("metrics-port")
    if port is not None and not 0 <= port <= 65535:
        raise UsageError(f"--metrics-port must lie in 0..65535, not {port}")
    metrics_file = values.get("metrics-file")
    if metrics_file is not None:
        from worker.metrics import check_textfile

        check_path(Path(str(metrics_file)), lambda: _origin(args, "metrics-file"))
        ledger_file = Path(str(ledger_path))
        check_textfile(
            Path(str(metrics_file)),
            not_these=[
                ledger_file,
                ledger_file.with_name(ledger_file.name + ".lock"),
                ledger_file.with_name(ledger_file.name + ".index"),
                ledger_file.with_name(ledger_file.name + ".spool"),  # the remembered validation
                manifest_path,
                *([account] if account is not None else []),
            ],
        )
    options = compose.Options(
        sandbox_account=account,
        profile=values.get("profile"),
        retry_rejected=bool(values.get("retry-rejected")),
        json=bool(getattr(args, "json", False)),
        job_name=_stem(Path(job) if job else manifest_path),
        metrics_file=Path(str(metrics_file)) if metrics_file is not None else None,
        metrics_port=port,
        metrics_host=values.get("metrics-host") or "127.0.0.1",
    )
    return settings, options


def _origin(args: argparse.Namespace, name: str) -> str:
    """Where option `name`'s value came from, for a message: the command line, the job
    file (command line > job file > environment, as in `_merged`) or a WORKER_* variable."""
    import tomllib

    from worker import jobfile

    if getattr(args, name.replace("-", "_"), None) not in (None, []):
        return "MANIFEST" if name == "manifest" else f"--{name}"
    job = getattr(args, "job", None)
    if job:
        try:
            if name in tomllib.loads(Path(job).read_text(encoding="utf-8")):
                return f"{job}: {name}"
        except (OSError, ValueError):
            pass  # it was read once already; this is only a message's wording
    return jobfile.env_var(name)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".jsonl", ".toml"):
        name = name.removesuffix(suffix)
    return name


def _sync_options(args: argparse.Namespace) -> Any:
    from worker.commands import sync as sync_command

    values = _merged(args, "sync")
    return sync_command.SyncOptions.build(
        prune=bool(values.get("prune")),
        projects=values.get("scope-project") or (),
        match=values.get("scope-match"),
        max_delete=values.get("max-delete"),
        check=bool(args.check),
    )


def _merged(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Each option's value: the command line, else the job file, else WORKER_* variables."""
    from worker import jobfile

    schema = {o.name: jobfile.OptionSpec(kind=o.kind) for o in OPTIONS if command in o.commands}
    schema["manifest"] = jobfile.OptionSpec(kind="path")
    merged: dict[str, Any] = dict(jobfile.env_values(os.environ, schema))
    if getattr(args, "job", None):
        job = jobfile.load(Path(args.job), schema, command=command)
        merged.update(job.values)
    for name in schema:
        value = getattr(args, name.replace("-", "_"), None)
        if value is not None and value != []:
            merged[name] = value
    if getattr(args, "headroom", None) is not None:
        merged["headroom"] = args.headroom
    return merged


# -- the parser ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse exits 2 too; keep its usage text
        self.print_usage(sys.stderr)
        self.exit(Exit.USAGE, f"error: {message}\n")


EPILOG = """\
exit codes: 0 the account matches the manifest; 1 rejected, invalid or conflicting items;
2 nothing was sent (usage, job file, manifest, credentials, ledger, plan refused);
3 run again later (deferred, endpoint or limiter unreachable, listing incomplete);
4 interrupted (resumable); 5 the ledger is locked by another run; 6 drift (sync --check);
7 stopped: the server refused the run or the ledger failed mid-run; 70 internal error.

environment: every run/sync/export option also reads WORKER_<NAME> (WORKER_RATE,
WORKER_ENDPOINT, WORKER_LIMITER, WORKER_SCOPE_PROJECT=a,b, ...); the command line wins over a
job file, which wins over the environment. Credentials: VOLCENGINE_ACCESS_KEY /
VOLCENGINE_SECRET_KEY / VOLCENGINE_SESSION_TOKEN or VOLC_ACCESSKEY / VOLC_SECRETKEY /
VOLC_SESSION_TOKEN, a `ve` profile (--profile), ~/.volc/credentials, ~/.volc/config.
"""


def _global_options(p: argparse.ArgumentParser, *, sub: bool) -> None:
    # On the subcommands the defaults are suppressed, so `-v run …` and `run … -v` both work.
    default: Any = argparse.SUPPRESS if sub else None
    p.add_argument(
        "-v", "--verbose", action="store_true", default=default if sub else False, help="debug logs"
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default if sub else False,
        help="warnings and errors only",
    )
    p.add_argument(
        "--log-format",
        choices=("auto", "console", "json"),
        default=default if sub else "auto",
        help="auto: console on a terminal, JSON lines otherwise",
    )


def _parser(*, sandbox: bool = True) -> argparse.ArgumentParser:
    """The parser. `sandbox`: define the sandbox's own options (only `worker sandbox …`
    needs them; other commands then never import the sandbox)."""
    from worker import jobfile  # numbers as typed (ASCII digits), for the numeric flags

    p = _Parser(
        prog="worker",
        description="Bulk provisioning of Volcengine Live "
        "pull-to-push groups: signed, paced, resumable.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"worker {__version__}")
    _global_options(p, sub=False)
    sub = p.add_subparsers(required=True, metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        c = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _global_options(c, sub=True)
        return c

    r = command("run", "create every manifest group the ledger does not record as done")
    s = command(
        "sync",
        "make the account match the manifest: create, update, and with "
        "--prune delete, planned from what the account holds",
    )
    e = command("export", "write the account's groups as a manifest")
    for c, name in ((r, "run"), (s, "sync"), (e, "export")):
        if name != "export":
            c.add_argument(
                "manifest", nargs="?", help="JSONL file, one group per line (may come from --job)"
            )
            c.add_argument("--job", help="a job file (TOML) naming the manifest and options")
            c.add_argument(
                "--dry-run",
                action="store_true",
                help="show the plan; send no write, record nothing",
            )
        for o in OPTIONS:
            if name not in o.commands:
                continue
            flag = f"--{o.name}"
            if o.kind == "bool":
                c.add_argument(flag, action="store_true", default=None, help=o.help)
            elif o.kind == "list":
                c.add_argument(
                    flag, action="append", metavar=o.name.split("-")[-1].upper(), help=o.help
                )
            else:
                kind = {"int": jobfile.integer, "float": jobfile.number}.get(o.kind, str)
                c.add_argument(flag, type=kind, help=o.help)
        c.add_argument("--headroom", type=jobfile.number, help=argparse.SUPPRESS)
        c.add_argument(
            "--sandbox",
            action="store_true",
            help="run against an embedded sandbox whose account is kept in "
            "--sandbox-account (no cloud account needed)",
        )
        c.add_argument(
            "--sandbox-account",
            help="the embedded sandbox's account file "
            "(default: beside the ledger; export: ./sandbox-account.json)",
        )
    r.set_defaults(command=cmd_run)
    s.add_argument(
        "--check",
        action="store_true",
        help="plan, write nothing; exit 0 when the account matches, 6 when not",
    )
    s.add_argument(
        "--json",
        action="store_true",
        help="with --dry-run/--check: the plan as one JSON object on stdout",
    )
    s.set_defaults(command=cmd_sync)
    e.add_argument("--project", action="append", help="only this ProjectName (repeatable)")
    e.add_argument("-o", "--output", help="write here (atomically) instead of stdout")
    e.set_defaults(command=cmd_export)

    v = command("validate", "check a manifest; send nothing")
    v.add_argument("manifest")
    v.set_defaults(command=cmd_validate)

    rep = command("report", "what a ledger says: counts, runs, what is not done")
    rep.add_argument("ledger")
    rep.add_argument(
        "--manifest",
        help="count against this manifest (default: the one the last run used, if unchanged)",
    )
    rep.add_argument("--json", action="store_true", help="machine-readable")
    rep.add_argument(
        "--failed",
        action="store_true",
        help="print a manifest of every line not done, to fix and run again",
    )
    rep.set_defaults(command=cmd_report)

    sb = command("sandbox", "run the local Live API in the foreground")
    if sandbox:
        from worker.sandbox import cli as sandbox_cli  # its arguments; the server in main

        sandbox_cli.add_arguments(sb)
        sb.set_defaults(command=sandbox_cli.main)
    return p
