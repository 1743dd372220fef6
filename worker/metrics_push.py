"""Metrics for batch jobs: push the run's registry to a Prometheus Pushgateway.

A batch job is gone before Prometheus would scrape it (`--metrics-port` serves only while a
run lasts), so `--metrics-push URL` sends the registry every `--metrics-push-interval`
seconds while the run lasts and once more at its end.

* Grouping key: job="worker", job_name, command. POST (prometheus_client's
  `pushadd_to_gateway`): only the metric families a push carries are replaced, and a family
  without samples is dropped by the gateway's parser, so a failed run leaves the last
  success time a successful one pushed (the textfile carries it over for the same reason).
* The URL: http(s)://HOST[:PORT][/PATH] (a path prefix, for a gateway behind a proxy); no
  user:password@ (a secret in a job file and in `ps`); plain http to any host: a Pushgateway
  is usually on a private network over http, and the metrics carry counts, a job name and
  API error codes, never a credential. Redirects are not followed (a 3xx is a failed push).
* A push that fails is a warning on stderr and never changes the exit code: the work was
  done, and an alert on `worker_last_success_timestamp_seconds` sees the missing push as a
  missing success. The final push's failure is always said; periodic ones once.
"""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Callable
from typing import Final

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import pushadd_to_gateway

from worker.urls import redact_url, split_url

log = structlog.get_logger("worker")

JOB: Final = "worker"
PUSH_TIMEOUT_S: Final = 5.0  # one push; the final one delays the exit by at most this


def check_push_url(url: str, named: str = "--metrics-push") -> None:
    """A UsageError, showing only the redacted URL, unless `url` is
    http(s)://HOST[:PORT][/PATH] with no credentials, query or fragment."""
    parts, refuse = split_url(url, named, expected="http(s)://HOST[:PORT][/PATH]")
    host, port = parts.hostname, parts.port
    if parts.scheme not in ("http", "https") or not host:
        raise refuse("expected a Pushgateway's http(s)://HOST[:PORT][/PATH]")
    if "@" in parts.netloc:
        raise refuse("remove the user:password@ part (it would show in ps and the job file)")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise refuse("give only scheme, host, port and a path prefix")
    if port == 0:
        raise refuse("port 0 is not a port to connect to")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A 3xx is an answer we did not ask for: urllib turns a redirected POST into a GET."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # urllib then raises HTTPError for the 3xx


def _no_redirects(
    url: str, method: str, timeout: float | None, headers: list[tuple[str, str]], data: bytes
) -> Callable[[], None]:
    """prometheus_client's push handler, without following redirects."""

    def handle() -> None:
        request = urllib.request.Request(url, data=data, method=method)
        for name, value in headers:
            request.add_header(name, value)
        opener = urllib.request.build_opener(_NoRedirect)
        with opener.open(request, timeout=timeout) as answer:
            if not 200 <= answer.status < 300:
                raise OSError(f"HTTP {answer.status}")

    return handle


class Pusher:
    """Pushes one registry to one gateway: every `interval_s` in a thread, and `final()`."""

    def __init__(
        self,
        url: str,
        registry: CollectorRegistry,
        *,
        grouping: dict[str, str],
        interval_s: float,
    ) -> None:
        self.url = url
        self._registry = registry
        self._grouping = grouping
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one push at a time: the final one waits for a tick's
        self._thread: threading.Thread | None = None
        self._warned = False

    def __repr__(self) -> str:
        return f"<Pusher {redact_url(self.url)} every {self._interval_s:g}s>"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._every, name="metrics-push", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def final(self) -> bool:
        """Stop the periodic pushes and push the run's last word; True if it arrived."""
        self.stop()
        return self.push(final=True)

    def _every(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.push(final=False)

    def push(self, *, final: bool) -> bool:
        with self._lock:
            try:
                pushadd_to_gateway(
                    self.url,
                    job=JOB,
                    registry=self._registry,
                    grouping_key=self._grouping,
                    timeout=PUSH_TIMEOUT_S,
                    handler=_no_redirects,
                )
            except (OSError, ValueError) as exc:  # urllib's errors are OSErrors
                if final or not self._warned:
                    self._warned = True
                    log.warning(
                        "metrics.push_failed",
                        url=redact_url(self.url),
                        error=str(exc)[:200],
                        final=final,
                        hint="the exit code is unchanged; the gateway keeps the last push "
                        "that arrived"
                        if final
                        else "trying again every interval and at the end",
                    )
                return False
        return True
