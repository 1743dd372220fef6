"""Prometheus metrics of one run: counted by the runner, written as a textfile, served on HTTP.

Every run has its own CollectorRegistry (never the library's global one), so tests and
several runs in one process do not share counters. Every series carries two constant labels,
`command` (run, sync) and `job_name` (the job file's or manifest's stem): node_exporter's
textfile collector merges every *.prom file of its directory, and two jobs writing the same
series would make the whole scrape fail.

`worker_last_success_timestamp_seconds` is what an alert watches ("no successful sync in 26
hours"). A run that does not succeed must not erase it, so the textfile of a run that has
not (yet) succeeded carries the value over from the file it replaces.

Label values that come from the network (`code`) are bounded: anything that does not look
like an API error code becomes "other", so a hostile server cannot grow the registry.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.exposition import write_to_textfile
from prometheus_client.parser import text_string_to_metric_families

from worker import __version__
from worker.errors import UsageError

LAST_SUCCESS = "worker_last_success_timestamp_seconds"
# worker_plan_items' actions, as reconcile.SyncPlan.counts names them.
PLAN_ACTIONS: Final = ("create", "update", "delete", "conflict", "replace")
_LABEL_VALUE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_MAX_PREVIOUS = 1 << 20  # the textfile we replace is a few KiB; do not read a huge one


def bounded(value: str) -> str:
    """`value` if it looks like an action, outcome or error code, else "other"."""
    return value if _LABEL_VALUE.fullmatch(value) else "other"


class Metrics:
    """The counters and gauges of one run, in their own registry.

    The runner calls `request`, `item`, `throttle`, `retry`, `in_flight`, `rates` as things
    happen, `finish` once at the end; the CLI writes `write_textfile` periodically and at the
    end, and/or wraps the run in `serve`. Without either sink it only counts.
    """

    def __init__(self, *, command: str, job_name: str, started_at: float | None = None) -> None:
        self.command = command
        self.job_name = job_name
        self.registry = CollectorRegistry()
        const = ("command", "job_name")
        reg = self.registry
        self._requests = Counter(
            "worker_requests", "API requests answered, by action and answer code "
            "(ok, an error code, or a transport failure)",
            [*const, "action", "code"], registry=reg)  # fmt: skip
        self._items = Counter(
            "worker_items", "Items finished, by action and ledger outcome",
            [*const, "action", "outcome"], registry=reg)  # fmt: skip
        self._throttles = Counter(
            "worker_throttles", "FlowLimitExceeded answers (each pauses everyone)",
            const, registry=reg).labels(command, job_name)  # fmt: skip
        self._retries = Counter(
            "worker_retries", "Attempts scheduled again after a retryable failure",
            const, registry=reg).labels(command, job_name)  # fmt: skip
        # Read when collected: two lock-taking increments per request otherwise.
        self._in_flight_now = 0
        Gauge(
            "worker_in_flight", "Requests sent and not yet answered",
            const, registry=reg).labels(command, job_name).set_function(
                lambda: self._in_flight_now)  # fmt: skip
        self._rate_limit = Gauge(
            "worker_rate_limit", "The rate the worker keeps under, requests/s",
            const, registry=reg).labels(command, job_name)  # fmt: skip
        self._rate_achieved = Gauge(
            "worker_rate_achieved", "Requests/s achieved over the run so far",
            const, registry=reg).labels(command, job_name)  # fmt: skip
        self._duration = Gauge(
            "worker_run_duration_seconds", "How long the last run took (set when it ends)",
            const, registry=reg)  # fmt: skip
        self._last_success = Gauge(
            LAST_SUCCESS, "End time of the last run that finished with every item done",
            const, registry=reg)  # fmt: skip
        self._last_finish = Gauge(
            "worker_last_finish_timestamp_seconds", "End time of the last run, however it ended",
            const, registry=reg)  # fmt: skip
        info = Gauge(
            "worker_info", "Always 1: the worker's version", [*const, "version"], registry=reg
        )
        info.labels(command, job_name, __version__).set(1)
        if started_at is not None:
            Gauge(
                "worker_run_start_timestamp_seconds", "When the current run started",
                const, registry=reg).labels(command, job_name).set(started_at)  # fmt: skip
        self._plan_gauges(const)
        self._succeeded_at: float | None = None
        self._carried = False
        # The labelled children, by label values: `labels()` checks and builds a key on every
        # call, a cost paid on every request otherwise. Bounded as the labels are (`bounded`).
        self._request_counters: dict[tuple[str, str], Counter] = {}
        self._item_counters: dict[tuple[str, str], Counter] = {}

    def _plan_gauges(self, const: tuple[str, str]) -> None:
        """The plan of a `sync` (--check and --dry-run too), for a drift alert without logs."""
        self._plan_items = Gauge(
            "worker_plan_items", "What the last sync's last listing left to do, by action",
            [*const, "action"], registry=self.registry)  # fmt: skip
        self._last_check = Gauge(
            "worker_last_check_timestamp_seconds", "When a sync last compared the account "
            "with the manifest", const, registry=self.registry)  # fmt: skip

    def __repr__(self) -> str:
        return f"<Metrics {self.command} {self.job_name!r}>"

    # -- what the runner reports -----------------------------------------------------

    def request(self, action: str, code: str) -> None:
        self._child(self._request_counters, self._requests, action, code).inc()

    def item(self, action: str, outcome: str) -> None:
        self._child(self._item_counters, self._items, action, outcome).inc()

    def throttle(self) -> None:
        self._throttles.inc()

    def retry(self) -> None:
        self._retries.inc()

    def in_flight(self, delta: int) -> None:
        self._in_flight_now += delta

    def _child(
        self, cache: dict[tuple[str, str], Counter], family: Counter, a: str, b: str
    ) -> Counter:
        child = cache.get((a, b))
        if child is None:
            key = (bounded(a), bounded(b))
            child = family.labels(self.command, self.job_name, *key)
            if key == (a, b):  # a value that became "other" is not kept: it would grow the cache
                cache[key] = child
        return child

    def rates(self, limit: float, achieved: float) -> None:
        self._rate_limit.set(limit)
        self._rate_achieved.set(achieved)

    def plan(self, counts: Mapping[str, int], now: float) -> None:
        """A sync compared the account with the manifest at `now` (epoch seconds): what is
        left to do, per PLAN_ACTIONS (an action the plan does not count is 0)."""
        for action in PLAN_ACTIONS:
            self._plan_items.labels(self.command, self.job_name, action).set(counts.get(action, 0))
        self._last_check.labels(self.command, self.job_name).set(now)

    def finish(self, duration_s: float, success: bool, now: float) -> None:
        """The run ended at `now` (epoch seconds); `success`: every item done (exit 0)."""
        labels = (self.command, self.job_name)
        self._duration.labels(*labels).set(duration_s)
        self._last_finish.labels(*labels).set(now)
        if success:
            self._succeeded_at = now
            self._last_success.labels(*labels).set(now)

    # -- sinks -----------------------------------------------------------------------

    def write_textfile(self, path: Path) -> None:
        """Write the text format to `path` atomically (a temporary file beside it, renamed
        over it: node_exporter never reads half a file; the collector only reads *.prom, so
        the temporary name is not picked up). Raises OSError: the caller decides whether a
        metrics file that cannot be written should stop a run (it should not)."""
        if self._succeeded_at is None and not self._carried:
            self._carried = True  # read the old file once: later writes replace our own
            previous = previous_last_success(path, command=self.command, job_name=self.job_name)
            if previous is not None:
                self._last_success.labels(self.command, self.job_name).set(previous)
        write_to_textfile(str(path), self.registry)

    @contextlib.contextmanager
    def serve(self, port: int, host: str = "127.0.0.1") -> Iterator[str]:
        """Serve /metrics on host:port while the block runs; yields the URL (port 0 picks a
        free one). Loopback by default: the metrics name the account's projects and error
        codes, and a Prometheus on the same host (or a pod's sidecar) reaches 127.0.0.1;
        listening elsewhere (--metrics-host 0.0.0.0, e.g. in a pod) is an explicit choice."""
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise UsageError(f"--metrics-port {port}: cannot listen on {host}: "
                             f"{exc.strerror or exc}") from None  # fmt: skip
        try:
            raw_host, bound_port = server.server_address[:2]
            bound = raw_host.decode() if isinstance(raw_host, bytes) else raw_host
            shown = f"[{bound}]" if ":" in bound else bound
            yield f"http://{shown}:{bound_port}/metrics"
        finally:
            server.shutdown()  # stops serve_forever; the thread then returns
            server.server_close()
            thread.join(timeout=5)


def previous_last_success(path: Path, *, command: str, job_name: str) -> float | None:
    """worker_last_success_timestamp_seconds for (command, job_name) in the textfile at
    `path`, or None: no file, not a regular file, too big, or not parseable (a damaged
    file must not stop a run; the next success writes a good one)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(_MAX_PREVIOUS + 1)
    if len(data) > _MAX_PREVIOUS:
        return None
    best: float | None = None
    try:
        for family in text_string_to_metric_families(data.decode("utf-8")):
            for sample in family.samples:
                if (sample.name == LAST_SUCCESS
                        and sample.labels.get("command") == command
                        and sample.labels.get("job_name") == job_name):  # fmt: skip
                    best = sample.value if best is None else max(best, sample.value)
    except (ValueError, UnicodeDecodeError):
        return None
    return best


def check_textfile(path: Path, *, not_these: Iterable[Path], named: str = "--metrics-file") -> None:
    """--metrics-file may create a file or replace a metrics textfile, nothing else: never the
    run's ledger, its lock or index, the manifest or the sandbox's account (a typo in a job
    file would otherwise wipe them every night with exit 0), nor any other file. And it must
    be writable before anything is sent: a run whose metrics go nowhere is an alert that
    never fires, so a missing or read-only folder is exit 2, not a warning after the run."""
    real = os.path.realpath(path)
    for other in not_these:
        if real == os.path.realpath(other):
            raise UsageError(
                f"{named} {path}: that is {other}, which the run needs; choose "
                "another file (e.g. NAME.prom)"
            )
    _check_folder(path, named)
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UsageError(f"{named} {path}: cannot look at it: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{named} {path}: is a directory; name a file in it (e.g. NAME.prom)")
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{named} {path}: not a regular file")
    if info.st_size == 0:
        return
    try:
        with path.open("rb") as f:
            first = f.readline(4096)
    except OSError as exc:
        raise UsageError(f"{named} {path}: cannot read it: {exc.strerror}") from None
    if not first.startswith((b"# HELP ", b"# TYPE ")):
        raise UsageError(
            f"{named} {path}: refusing to replace a file that is not a Prometheus "
            "textfile; nothing was changed"
        )


def _check_folder(path: Path, named: str) -> None:
    """The textfile is written as a new file in its folder, renamed over it: so the folder
    must exist and take a new file. Tried for real (permissions, a read-only mount, a full
    inode table and ACLs all answer the same way): a temporary file, removed at once."""
    folder = path.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise UsageError(f"{named} {path}: its folder {folder} {what}; nothing was sent")
    try:
        fd, probe = tempfile.mkstemp(prefix=".worker-probe-", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise UsageError(
            f"{named} {path}: cannot create a file in {folder} ({exc.strerror}); the "
            "textfile is written beside its final name and renamed over it; nothing was sent"
        ) from None
    os.close(fd)
    os.unlink(probe)
