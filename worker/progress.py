"""Progress: a bar on a terminal; a structured line every few seconds anywhere else.

The line is also where throttles and retries show at the default level: in aggregate, since
one line per event would drown the log of a long run.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

import structlog
from tqdm import tqdm

from worker.runner.tally import Tally

log = structlog.get_logger("worker")
LINE_EVERY_S = 5.0


class Progress:
    """Reports a run's tally: `tick` every second, `close` at the end."""

    def __init__(self, *, tty: bool, total: int, stream: IO[str] | None = None) -> None:
        self._total = total
        self._last_line = time.monotonic()
        self._bar: tqdm[Any] | None = None
        if tty:
            self._bar = tqdm(
                total=total,
                unit="group",
                file=stream or sys.stderr,
                dynamic_ncols=True,
                smoothing=0.1,
            )

    def tick(self, tally: Tally) -> None:
        done = tally.finished + sum(tally.skipped.values())  # lines dealt with
        if self._bar is not None:
            self._bar.n = done
            self._bar.set_postfix_str(_outcomes(tally), refresh=False)
            self._bar.refresh()
            return
        now = time.monotonic()
        if now - self._last_line < LINE_EVERY_S:
            return
        self._last_line = now
        elapsed = now - tally.started
        rate = done / elapsed if elapsed > 0 else 0.0
        left = max(0, self._total - done)
        log.info(
            "run.progress",
            done=done,
            total=self._total,
            rate_per_s=round(rate, 2),
            requests=tally.requests,
            eta_s=round(left / rate) if rate > 0 else None,
            throttles=tally.throttles,
            retries=tally.retries,
            **tally.by_key(),
        )

    def close(self, tally: Tally) -> None:
        if self._bar is not None:
            self._bar.n = tally.finished + sum(tally.skipped.values())
            self._bar.set_postfix_str(_outcomes(tally), refresh=False)
            self._bar.close()


def _outcomes(tally: Tally) -> str:
    return " ".join(f"{k}={v}" for k, v in tally.by_key().items())
