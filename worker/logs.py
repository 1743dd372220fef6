"""Logging setup and the process's output streams.

Logs are structlog events on stderr, so that stdout carries only what a command is asked for
(the plan, the report, the --failed manifest) and can be piped: console lines on a terminal,
JSON lines otherwise. Context (the run id) is bound once with contextvars and merged into
every line. Never give a log event a credential: the signer's output (Authorization) and
Credentials stay out of every event.

A reader that goes away (`worker report … | head -1`) must not crash a run or leave its
ledger without a footer: `guard_stdio` makes writes to a closed pipe vanish instead.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from dataclasses import dataclass
from typing import IO, Any

import orjson
import structlog

from worker import log_sinks
from worker.errors import OutputError


class _Unbreakable:
    """A stream whose writes never raise an OSError out of the middle of a run.

    A closed pipe (EPIPE, a reader that went away) drops what follows. Any other failure
    (a full disk behind `> file`, an I/O error) drops it too on stderr, where nobody could be
    told; on stdout, which carries what a command was asked for, it is an OutputError (exit 2)
    rather than a traceback. Either way the file descriptor is pointed at /dev/null first, so
    the interpreter's final flush cannot fail again (exit 120)."""

    def __init__(self, stream: Any, *, strict: bool) -> None:
        self._stream = stream
        self._strict = strict
        self.closed_pipe = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def write(self, data: Any) -> int:
        try:
            return int(self._stream.write(data))
        except OSError as exc:
            self._lost(exc)
            return len(data)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            self._lost(exc)

    @property
    def buffer(self) -> Any:
        inner = getattr(self._stream, "buffer", None)
        return _Unbreakable(inner, strict=self._strict) if inner is not None else None

    def _lost(self, exc: OSError) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)
        if exc.errno in (errno.EPIPE, errno.ECONNRESET):
            self.closed_pipe = True
            return
        if self._strict:
            raise OutputError(f"cannot write the output: {exc.strerror or exc}") from None


def guard_stdio() -> None:
    """Make stdout and stderr survive a reader that closed its end of the pipe, a full disk,
    and a descriptor that was closed before we started (`worker … >&-`)."""
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - process-long
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - process-long
    if not isinstance(sys.stdout, _Unbreakable):
        sys.stdout = _Unbreakable(sys.stdout, strict=True)
    if not isinstance(sys.stderr, _Unbreakable):
        sys.stderr = _Unbreakable(sys.stderr, strict=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class LogFile:
    """An open --log-file: JSON lines at `level` (at least INFO whatever -q says: the file is
    the run's record, the terminal is for a person)."""

    fd: int
    shown_as: str
    level: int = logging.INFO


def configure(
    *,
    json: bool,
    level: int = logging.INFO,
    stream: IO[str] | None = None,
    log_file: LogFile | None = None,
) -> None:
    """Events to `stream` (stderr) as JSON or console lines at `level`, and to `log_file`.
    The console at INFO and above shows no per-group line (log_sinks.PerGroupQuiet)."""
    out = stream or sys.stderr
    json_render = structlog.processors.JSONRenderer(serializer=orjson.dumps)
    tracebacks = structlog.processors.dict_tracebacks

    def as_json(logger: Any, method: str, event: log_sinks.Event) -> str | bytes:
        return json_render(logger, method, tracebacks(logger, method, event))

    sinks: list[log_sinks.Sink] = []
    if json:
        sinks.append(log_sinks.Sink(level=level, render=as_json, write=log_sinks.json_writer(out)))
    else:
        console = structlog.dev.ConsoleRenderer(colors=out.isatty())
        sinks.append(
            log_sinks.Sink(
                level=level,
                render=console,
                write=log_sinks.console_writer(out),
                admit=log_sinks.PerGroupQuiet() if level > logging.DEBUG else _everything,
            )
        )
    if log_file is not None:
        sinks.append(
            log_sinks.Sink(
                level=log_file.level,
                render=as_json,
                write=log_sinks.fd_writer(log_file.fd, log_file.shown_as),
            )
        )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            log_sinks.FanOut(sinks),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(min(s.level for s in sinks)),
        logger_factory=structlog.ReturnLoggerFactory(),
        cache_logger_on_first_use=False,
    )


def _everything(event: log_sinks.Event) -> log_sinks.Event:
    return event
