"""The run's metrics and where they go: a textfile every tick and at the end, /metrics while
the run lasts, and a Pushgateway every interval and at the end (metrics_push.py)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import structlog

from worker.errors import Exit
from worker.metrics import Metrics
from worker.metrics_push import Pusher
from worker.settings import CommandOptions

if TYPE_CHECKING:
    from worker.runner.tally import Tally

log = structlog.get_logger("worker")


class Published:
    """The run's metrics and where they go: a textfile every tick and at the end, /metrics
    and the periodic pushes while the run lasts, the final push at its end. A metrics file
    or gateway that fails mid-run never stops a run (both are checked before it starts)."""

    def __init__(self, options: CommandOptions, command: str, rate_limit: float) -> None:
        self.metrics = Metrics(command=command, job_name=options.job_name, started_at=time.time())
        self.metrics.rates(rate_limit, 0.0)  # a scrape before the first tick reads --rate
        self._file = options.metrics_file
        self._port = options.metrics_port
        self._host = options.metrics_host
        self._warned = False
        self._pusher = (
            Pusher(
                options.metrics_push,
                self.metrics.registry,
                grouping={"job_name": options.job_name, "command": command},
                interval_s=options.metrics_push_interval_s,
            )
            if options.metrics_push is not None
            else None
        )

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """/metrics and the periodic pushes while the block runs."""
        with contextlib.ExitStack() as stack:
            if self._pusher is not None:
                self._pusher.start()
                stack.callback(self._pusher.stop)
            if self._port is not None:
                url = stack.enter_context(self.metrics.serve(self._port, self._host))
                log.info("metrics.serving", url=url)
            yield

    def planned(self, counts: Mapping[str, int]) -> None:
        """A sync compared the account with the manifest: its plan, now."""
        self.metrics.plan(counts, now=time.time())
        self.write()

    def looked(self) -> None:
        """The end of work that records nothing (sync --check, --dry-run): the last word."""
        self.write()
        self._push_final()

    def tick(self, tally: Tally, rate_limit: float) -> None:
        self.metrics.rates(rate_limit, tally.rate)
        self.write()

    def finish(self, tally: Tally, rate_limit: float, duration_s: float, code: Exit) -> None:
        self.metrics.rates(rate_limit, tally.rate)
        now = time.time()
        self.metrics.finish(duration_s, success=code is Exit.OK, now=now)
        if code is Exit.OK and self.metrics.command == "sync":
            # Exit 0: the sync's last listing showed the manifest; nothing is left to do.
            self.metrics.plan({}, now=now)
        self.write()
        self._push_final()

    def _push_final(self) -> None:
        if self._pusher is not None and self._pusher.final():
            log.info("metrics.pushed", url=repr(self._pusher))

    def write(self) -> None:
        if self._file is None:
            return
        try:
            self.metrics.write_textfile(self._file)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("metrics.unwritable", path=str(self._file), error=exc.strerror)
