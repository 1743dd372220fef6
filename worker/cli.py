"""Command line: arguments in, exit codes out; the only module that knows it is a process.

The options are options.OPTIONS (one table: parser, job file, environment, ranges, docs);
signals are handled from the first instruction to the last (signals.py); and this is the one
place where an error becomes an exit code: every WorkerError becomes a message and the code
its class carries (errors.py). Anything else is a bug: its traceback is printed, exit 70.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import re
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from worker import __version__, cli_text, logs, options
from worker.errors import Exit, LedgerLocked, ManifestError, WorkerError
from worker.signals import INTERRUPTED_EARLY, Interrupted, install_early, under_signals
from worker.userpaths import check_path


def main(argv: Sequence[str] | None = None) -> NoReturn:
    sys.exit(run_cli(argv))


def run_cli(argv: Sequence[str] | None = None) -> int:
    install_early()  # first: a signal during start-up is an orderly exit 4
    logs.guard_stdio()
    try:
        words = list(sys.argv[1:] if argv is None else argv)
        args = _parse(words)
        _configure_logs(args)
        return int(args.command(args))
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
        print(INTERRUPTED_EARLY, file=sys.stderr)
        return Exit.INTERRUPTED
    except Exception:
        traceback.print_exc(file=sys.stderr)
        print(
            "error: internal error (a bug in worker; the ledger is consistent): please "
            "report it with the traceback above",
            file=sys.stderr,
        )
        return Exit.INTERNAL


def _configure_logs(args: argparse.Namespace, log_file: logs.LogFile | None = None) -> None:
    """The terminal: console lines (and the bar) on a terminal, JSON lines otherwise, at the
    level -v/-q say; and the --log-file, if one is open."""
    tty = sys.stderr.isatty()
    fmt = args.log_format if args.log_format != "auto" else ("console" if tty else "json")
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logs.configure(json=fmt == "json", level=level, log_file=log_file)


@contextlib.contextmanager
def _logging_to(args: argparse.Namespace, path: Path | None) -> Iterator[None]:
    """For the command's length, the log goes to --log-file too (checked by resolve)."""
    if path is None:
        yield
        return
    from worker.logfile import open_log_file

    fd = open_log_file(path, "--log-file")
    try:
        level = logging.DEBUG if args.verbose else logging.INFO
        _configure_logs(args, logs.LogFile(fd=fd, shown_as=str(path), level=level))
        yield
    finally:
        _configure_logs(args)  # before the close: no event may reach a reused descriptor
        os.close(fd)


# -- commands -----------------------------------------------------------------------------


def cmd_send(args: argparse.Namespace) -> int:
    """run, sync and export: resolve the options, then the command under signal handling."""
    from worker import resolve
    from worker.commands import export, run, sync
    from worker.runner.controls import Controls
    from worker.session import Session

    if getattr(args, "output", None):
        check_path(Path(args.output), "-o")
    line = options.CommandLine.of(args, args.name)
    got = resolve.resolve(line, os.environ)
    session = Session(
        command=args.name,
        settings=got.settings,
        options=got.options,
        controls=Controls(),
        under_signals=under_signals(got.settings.grace_s),
        out=sys.stdout,
    )
    with _logging_to(args, got.options.log_file):
        if got.sync is not None:
            return sync.sync(session, got.sync)
        if args.name == "export":
            output = Path(args.output) if args.output else None
            return export.export(session, frozenset(args.project or ()), output)
        return run.run(session)


def cmd_validate(args: argparse.Namespace) -> int:
    from worker.commands.validate import validate

    return validate(Path(args.manifest), sys.stdout)


def cmd_report(args: argparse.Namespace) -> int:
    from worker.commands import report

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


# -- the parser ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """No abbreviations (`--scope` must not be read as `--scope-project` in a cron line);
    an unknown option or command is answered with the closest known one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # argparse exits 2 too; keep its usage text
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if choice:
            known = re.findall(r"'([^']*)'", choice.group(2))
            message += _did_you_mean(choice.group(1), known)
        self.print_usage(sys.stderr)
        self.exit(Exit.USAGE, f"error: {message}\n")

    def unknown(self, words: list[str]) -> NoReturn:
        flags = [s for s in self._option_string_actions if s.startswith("--")]
        hints = "".join(_did_you_mean(w.partition("=")[0], flags) for w in words[:1])
        self.error(f"unrecognized arguments: {' '.join(words)}{hints}")


def _did_you_mean(word: str, known: list[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _global_options(p: argparse.ArgumentParser, *, sub: bool) -> None:
    # On the subcommands the defaults are suppressed, so `-v run …` and `run … -v` both work.
    def default(value: object) -> object:
        return argparse.SUPPRESS if sub else value

    p.add_argument("-v", "--verbose", action="store_true", default=default(False), help="debug")
    p.add_argument(
        "-q", "--quiet", action="store_true", default=default(False), help="warnings and errors"
    )
    p.add_argument(
        "--log-format",
        choices=("auto", "console", "json"),
        default=default("auto"),
        help="auto: console on a terminal, JSON lines otherwise",
    )


def _parser(*, sandbox: bool = True) -> tuple[_Parser, dict[str, _Parser]]:
    """The parser and its commands'. `sandbox`: define the sandbox's own options (only
    `worker sandbox …` needs them; other commands then never import the sandbox)."""
    p = _Parser(
        prog="worker",
        description="Bulk provisioning of Volcengine Live "
        "pull-to-push groups: signed, paced, resumable.",
        epilog="`worker COMMAND --help` shows a command's options, examples and exit codes.",
    )
    p.add_argument("--version", action="version", version=f"worker {__version__}")
    _global_options(p, sub=False)
    sub = p.add_subparsers(required=True, metavar="COMMAND", parser_class=_Parser)
    commands: dict[str, _Parser] = {}
    for name, text in cli_text.COMMANDS.items():
        epilog = cli_text.epilog(name)
        c = sub.add_parser(name, help=text, description=text, epilog=epilog)
        _global_options(c, sub=True)
        c.set_defaults(name=name)
        commands[name] = c
    for name in options.SENDING:
        options.add_arguments(commands[name], name)
        commands[name].set_defaults(command=cmd_send)
    commands["validate"].add_argument("manifest")
    commands["validate"].set_defaults(command=cmd_validate)
    rep = commands["report"]
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
    if sandbox:
        from worker.sandbox import cli as sandbox_cli  # its arguments; the server in main

        sandbox_cli.add_arguments(commands["sandbox"])
        commands["sandbox"].set_defaults(command=sandbox_cli.main)
    return p, commands


def _parse(words: list[str]) -> argparse.Namespace:
    """The arguments; an unknown option is refused by its command, with a suggestion."""
    top, commands = _parser(sandbox="sandbox" in words)
    args, extra = top.parse_known_args(words)
    if extra:
        commands.get(getattr(args, "name", ""), top).unknown(extra)
    return args
