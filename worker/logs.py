"""Logging setup: structlog events, console lines on a terminal, JSON lines otherwise.

Logs go to stderr so that stdout carries only what a command is asked for (the plan, the
report, the --failed manifest) and can be piped. Never give a log event a credential: the
signer's output (Authorization) and Credentials stay out of every event.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Any

import orjson
import structlog
from tqdm import tqdm


class _TqdmAwareWriter:
    """Writes console log lines through tqdm so a progress bar is redrawn below them."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        tqdm.write(message, file=self._stream)

    log = debug = info = warning = warn = error = critical = exception = msg


def configure(*, json: bool, level: int = logging.INFO, stream: IO[str] | None = None) -> None:
    out = stream or sys.stderr
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json:
        processors = [*shared, structlog.processors.dict_tracebacks,
                      structlog.processors.JSONRenderer(serializer=orjson.dumps)]
        factory: Any = structlog.BytesLoggerFactory(getattr(out, "buffer", None))
    else:
        processors = [*shared, structlog.dev.ConsoleRenderer(colors=out.isatty())]
        factory = lambda *args: _TqdmAwareWriter(out)  # noqa: E731
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
