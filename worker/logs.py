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


class _Unbreakable:
    """A stream whose writes to a closed pipe are dropped: the first EPIPE points the file
    descriptor at /dev/null, so later writes and the interpreter's final flush succeed."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
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
        return _Unbreakable(inner) if inner is not None else None

    def _lost(self, exc: OSError) -> None:
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
            raise exc
        self.closed_pipe = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)


def guard_stdio() -> None:
    """Make stdout and stderr survive a reader that closed its end of the pipe."""
    if not isinstance(sys.stdout, _Unbreakable):
        sys.stdout = _Unbreakable(sys.stdout)
    if not isinstance(sys.stderr, _Unbreakable):
        sys.stderr = _Unbreakable(sys.stderr)


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
