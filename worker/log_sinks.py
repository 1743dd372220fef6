"""Where log events go: each sink renders an event its own way, at its own level.

One run may write to two places at once: the terminal (console lines threaded through the
progress bar, or JSON lines off a terminal) and a --log-file (JSON lines). structlog ends a
chain in one renderer and one logger, so the chain ends here instead: `FanOut` hands a copy
of each event to every sink that wants it, then drops the event (structlog.DropEvent).

The console is for a person: at the default verbosity it shows no per-group line (a
2000-group run would print 2000 of them through the bar). A failed group is worth seeing at
once, so the first few per-group warnings are shown, then one line saying where the rest
are; `-v` shows every line. JSON sinks keep every event: they are for machines and audits.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import IO, Any

import structlog
from tqdm import tqdm

Event = MutableMapping[str, Any]
SHOWN_GROUP_WARNINGS = 10  # per-group warnings a console shows before it says "and more"
_LEVELS = logging.getLevelNamesMapping()


@dataclass(frozen=True, slots=True, kw_only=True)
class Sink:
    """One destination: the least level it takes, an optional filter, a renderer, a writer."""

    level: int
    render: Callable[[Any, str, Event], str | bytes]
    write: Callable[[str | bytes], None]
    admit: Callable[[Event], Event | None] = lambda event: event


class FanOut:
    """The chain's last processor: every sink that wants the event gets its own copy."""

    def __init__(self, sinks: list[Sink]) -> None:
        self._sinks = sinks

    def __call__(self, logger: Any, method: str, event: Event) -> Event:
        level = _LEVELS.get(str(event.get("level", "info")).upper(), logging.INFO)
        for sink in self._sinks:
            if level < sink.level:
                continue
            admitted = sink.admit(dict(event))
            if admitted is not None:
                sink.write(sink.render(logger, method, admitted))
        raise structlog.DropEvent


class PerGroupQuiet:
    """A console filter at the default verbosity: no `group.*` info line; the first
    SHOWN_GROUP_WARNINGS `group.*` warnings, then one line saying where the rest are."""

    def __init__(self, shown: int = SHOWN_GROUP_WARNINGS) -> None:
        self._left = shown

    def __call__(self, event: Event) -> Event | None:
        if not str(event.get("event", "")).startswith("group."):
            return event
        if _LEVELS.get(str(event.get("level", "")).upper(), 0) < logging.WARNING:
            return None
        self._left -= 1
        if self._left >= 0:
            return event
        if self._left == -1:
            return {
                **{k: event[k] for k in ("timestamp", "run_id") if k in event},
                "level": "warning",
                "event": "group.more_not_shown",
                "hint": "further per-group warnings are not shown here: -v shows them, "
                "the run's summary counts them and `worker report LEDGER --failed` lists them",
            }
        return None


def console_writer(stream: IO[str]) -> Callable[[str | bytes], None]:
    """Lines through tqdm, so that a progress bar is redrawn below them."""

    def write(line: str | bytes) -> None:
        tqdm.write(line.decode() if isinstance(line, bytes) else line, file=stream)

    return write


def json_writer(stream: IO[str]) -> Callable[[str | bytes], None]:
    """JSON lines to a stream: to its byte buffer when it has one, flushed per line."""
    buffer = getattr(stream, "buffer", None)

    def write(line: str | bytes) -> None:
        data = line if isinstance(line, bytes) else line.encode()
        if buffer is not None:
            buffer.write(data + b"\n")
            buffer.flush()
        else:
            stream.write(data.decode() + "\n")
            stream.flush()

    return write


def fd_writer(fd: int, shown_as: str) -> Callable[[str | bytes], None]:
    """Lines appended to an open file (--log-file). A file that cannot be written (a full
    disk) never stops a run: it is said once on stderr, and the file gets nothing more."""
    broken = False

    def write(line: str | bytes) -> None:
        nonlocal broken
        if broken:
            return
        data = memoryview((line if isinstance(line, bytes) else line.encode()) + b"\n")
        try:
            while data:
                data = data[os.write(fd, data) :]
        except OSError as exc:
            broken = True
            print(
                f"warning: --log-file {shown_as}: cannot write ({exc.strerror or exc}); "
                "it gets no more lines this run",
                file=sys.stderr,
            )

    return write
