"""The process's signals before an event loop runs: SIGINT/SIGTERM become `Interrupted`.

Installed as the first thing the process does (worker/__main__.py, before the heavy imports),
so a signal during start-up, the manifest scan or the ledger's opening is an orderly exit 4,
never the default disposition's silent 143. While a run's event loop is up, the CLI's own
handlers (loop.add_signal_handler) take over, and these come back when the loop ends.
"""

from __future__ import annotations

import signal
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A signal arrived while no event loop was running. A BaseException, like
    KeyboardInterrupt: no `except Exception` on the way may swallow it."""


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def install_early() -> None:
    for sig in SIGNALS:
        signal.signal(sig, _raise)
