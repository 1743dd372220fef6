"""Progress: a bar on a terminal; a structured line every few seconds anywhere else.

Both count this run's work only. A line the plan skips (done by an earlier run, unchanged)
costs no request, so counting it as progress would make a resumed run look fast and its ETA
short: 1165 skips in the first second of a 2000-line resume read as 1165 groups/s. So:

* done: the items this run has a result for; total: the manifest's lines less those skipped
  so far (it shrinks as `run` streams past skips it could not count in advance), never less
  than done (sync's later rounds may add work). Skips are shown beside, as a count.
* rate: the requests sent over the time they took, (requests - 1) / (now - first send). The
  pacer spaces sends at least 1/target apart, and `now` is no earlier than the last send, so
  this never exceeds the pacer's target, hence --rate, by construction.
* ETA: the work left at that rate (each item takes at least one request; retries make it an
  underestimate, never an overestimate).

The line is also where throttles and retries show at the default level: in aggregate, since
one line per event would drown the log of a long run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import structlog
from tqdm import tqdm

from worker.runner.tally import Tally

log = structlog.get_logger("worker")
LINE_EVERY_S = 5.0
# tqdm's own rate and remaining time count `n` over time: not used (see above).
BAR_FORMAT = "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


@dataclass(frozen=True, slots=True, kw_only=True)
class Figures:
    """This run's progress at one moment."""

    done: int
    total: int
    skipped: int
    rate: float | None  # requests/s; None before two requests
    eta_s: float | None

    def eta_text(self) -> str:
        if self.eta_s is None:
            return "eta ?"
        minutes, seconds = divmod(round(self.eta_s), 60)
        hours, minutes = divmod(minutes, 60)
        return (
            f"eta {hours}:{minutes:02d}:{seconds:02d}"
            if hours
            else f"eta {minutes:02d}:{seconds:02d}"
        )


def figures(tally: Tally, lines: int, now: float) -> Figures:
    """This run's work in `tally` against a manifest of `lines` items (see the module)."""
    skipped = sum(tally.skipped.values())
    done = tally.finished
    total = max(done, lines - skipped)
    rate = tally.rate_at(now)
    eta = (total - done) / rate if rate else None
    return Figures(done=done, total=total, skipped=skipped, rate=rate, eta_s=eta)


class Progress:
    """Reports a run's tally: `tick` every second, `close` at the end (once)."""

    def __init__(
        self,
        *,
        tty: bool,
        total: int,
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lines = total
        self._clock = clock
        self._last_line = clock()
        self._bar: tqdm[Any] | None = None
        if tty:
            self._bar = tqdm(
                total=total,
                unit="group",
                file=stream or sys.stderr,
                dynamic_ncols=True,
                bar_format=BAR_FORMAT,
            )

    def tick(self, tally: Tally) -> None:
        now = self._clock()
        seen = figures(tally, self._lines, now)
        if self._bar is not None:
            self._draw(self._bar, seen, tally)
            return
        if now - self._last_line < LINE_EVERY_S:
            return
        self._last_line = now
        log.info(
            "run.progress",
            done=seen.done,
            total=seen.total,
            skipped=seen.skipped,
            rate_per_s=round(seen.rate, 2) if seen.rate is not None else None,
            requests=tally.requests,
            eta_s=round(seen.eta_s) if seen.eta_s is not None else None,
            throttles=tally.throttles,
            retries=tally.retries,
            **tally.by_key(),
        )

    def close(self, tally: Tally) -> None:
        if self._bar is not None:
            self._draw(self._bar, figures(tally, self._lines, self._clock()), tally)
            self._bar.close()
            self._bar = None

    @staticmethod
    def _draw(bar: tqdm[Any], seen: Figures, tally: Tally) -> None:
        bar.total = seen.total
        bar.n = seen.done
        rate = f"{seen.rate:.1f} req/s" if seen.rate is not None else "- req/s"
        parts = [seen.eta_text(), rate]
        if seen.skipped:
            parts.append(f"{seen.skipped} skipped")
        parts.extend(f"{k}={v}" for k, v in tally.by_key().items())
        bar.set_postfix_str(", ".join(parts), refresh=False)
        bar.refresh()
