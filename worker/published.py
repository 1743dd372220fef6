"""The run's metrics and where they go: a textfile every tick and at the end, and /metrics
while the run lasts."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import structlog

from worker.errors import Exit
from worker.metrics import Metrics
from worker.settings import CommandOptions

if TYPE_CHECKING:
    from worker.runner.tally import Tally

log = structlog.get_logger("worker")


class Published:
    """The run's metrics and where they go: a textfile every tick and at the end, and
    /metrics while the run lasts. A metrics file that cannot be written never stops a run."""

    def __init__(self, options: CommandOptions, command: str, rate_limit: float) -> None:
        self.metrics = Metrics(command=command, job_name=options.job_name, started_at=time.time())
        self.metrics.rates(rate_limit, 0.0)  # a scrape before the first tick reads --rate
        self._file = options.metrics_file
        self._port = options.metrics_port
        self._host = options.metrics_host
        self._warned = False

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        if self._port is None:
            yield
            return
        with self.metrics.serve(self._port, self._host) as url:
            log.info("metrics.serving", url=url)
            yield

    def tick(self, tally: Tally, rate_limit: float) -> None:
        self.metrics.rates(rate_limit, tally.rate)
        self.write()

    def finish(self, tally: Tally, rate_limit: float, duration_s: float, code: Exit) -> None:
        self.metrics.rates(rate_limit, tally.rate)
        self.metrics.finish(duration_s, success=code is Exit.OK, now=time.time())
        self.write()

    def write(self) -> None:
        if self._file is None:
            return
        try:
            self.metrics.write_textfile(self._file)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("metrics.unwritable", path=str(self._file), error=exc.strerror)
