"""`python -m worker` and the `worker` command: signals first, then everything else."""

from __future__ import annotations

import signal
import sys
from typing import NoReturn

from worker import signals
from worker.errors import Exit

# Before the imports below (aiohttp, structlog, orjson take a while): a SIGTERM from here on
# ends the process with exit 4 and a message, not silently with 143.
signals.install_early()


def entry() -> NoReturn:
    try:
        from worker.cli import run_cli

        code = run_cli()
    except signals.Interrupted:  # during the imports, before run_cli's own handling
        print(signals.INTERRUPTED_EARLY, file=sys.stderr)
        code = Exit.INTERRUPTED
    # The exit code is decided: a signal now would only garble it.
    for sig in signals.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    entry()
