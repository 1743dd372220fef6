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
from typing import IO, Any

import orjson
import structlog
from tqdm import tqdm

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


class _TqdmAwareWriter:
    """Writes console log lines through tqdm so a progress bar is redrawn below them."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        tqdm.write(message, file=self._stream)

    log = debug = info = warning = warn = error = critical = exception = msg


class _TextJsonWriter:
    """JSON lines to a text stream that has no byte buffer (a StringIO, a wrapped stream)."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def msg(self, message: bytes | str) -> None:
        text = message.decode() if isinstance(message, bytes) else message
        self._stream.write(text + "\n")
        self._stream.flush()

    log = debug = info = warning = warn = error = critical = exception = msg


def configure(*, json: bool, level: int = logging.INFO, stream: IO[str] | None = None) -> None:
    out = stream or sys.stderr
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    factory: Any
    if json:
        processors = [
            *shared,
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ]
        buffer = getattr(out, "buffer", None)
        if buffer is not None:
            factory = structlog.BytesLoggerFactory(buffer)
        else:
            factory = lambda *args: _TextJsonWriter(out)  # noqa: E731
    else:
        processors = [*shared, structlog.dev.ConsoleRenderer(colors=out.isatty())]
        factory = lambda *args: _TqdmAwareWriter(out)  # noqa: E731
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
