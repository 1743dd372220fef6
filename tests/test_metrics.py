"""Run metrics: the textfile parses, is written atomically, keeps the last success; /metrics
is served on loopback while a block runs and stops afterwards."""

from __future__ import annotations

import os
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from worker import __version__
from worker.errors import UsageError
from worker.metrics import LAST_SUCCESS, Metrics, bounded, previous_last_success


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a text exposition, keyed by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    labels = {"command": "sync", "job_name": "nightly", **labels}
    return samples(text).get((name, tuple(sorted(labels.items()))))


def busy_run() -> Metrics:
    m = Metrics(command="sync", job_name="nightly", started_at=1_700_000_000.0)
    for code in ("ok", "ok", "FlowLimitExceeded", "InternalError", "timeout"):
        m.request("CreatePullToPushGroup", code)
    m.request("ListPullToPushGroup", "ok")
    m.item("create", "created")
    m.item("create", "deferred")
    m.item("update", "updated")
    m.throttle()
    m.retry()
    m.retry()
    m.in_flight(+3)
    m.in_flight(-1)
    m.rates(limit=10.0, achieved=9.4)
    return m


def test_textfile_parses_with_the_prometheus_parser(tmp_path: Path) -> None:
    """Every interface metric is in the file, with the counts the runner reported."""
    m = busy_run()
    m.finish(duration_s=12.5, success=True, now=1_700_000_100.0)
    path = tmp_path / "sync.prom"
    m.write_textfile(path)
    text = path.read_text()
    assert value(text, "worker_requests_total", action="CreatePullToPushGroup", code="ok") == 2
    assert value(text, "worker_requests_total", action="ListPullToPushGroup", code="ok") == 1
    assert value(text, "worker_requests_total", action="CreatePullToPushGroup", code="timeout") == 1
    assert value(text, "worker_items_total", action="create", outcome="deferred") == 1
    assert value(text, "worker_items_total", action="update", outcome="updated") == 1
    assert value(text, "worker_throttles_total") == 1
    assert value(text, "worker_retries_total") == 2
    assert value(text, "worker_in_flight") == 2
    assert value(text, "worker_rate_limit") == 10.0
    assert value(text, "worker_rate_achieved") == 9.4
    assert value(text, "worker_run_duration_seconds") == 12.5
    assert value(text, LAST_SUCCESS) == 1_700_000_100.0
    assert value(text, "worker_last_finish_timestamp_seconds") == 1_700_000_100.0
    assert value(text, "worker_run_start_timestamp_seconds") == 1_700_000_000.0
    assert value(text, "worker_info", version=__version__) == 1


def test_registries_are_per_run() -> None:
    """Two runs in one process count separately (no global registry)."""
    a, b = Metrics(command="run", job_name="a"), Metrics(command="run", job_name="a")
    a.throttle()
    assert (
        a.registry.get_sample_value("worker_throttles_total", {"command": "run", "job_name": "a"})
        == 1
    )
    assert (
        b.registry.get_sample_value("worker_throttles_total", {"command": "run", "job_name": "a"})
        == 0
    )


def test_network_label_values_are_bounded() -> None:
    """A code a hostile server makes up (long, spaces, newlines) becomes 'other'."""
    assert bounded("InvalidParam.BindError") == "InvalidParam.BindError"
    assert bounded("x" * 65) == bounded("a b") == bounded("a\nb") == bounded("") == "other"
    m = Metrics(command="run", job_name="j")
    m.request("CreatePullToPushGroup", 'evil"} 1\nfake_metric 9')
    labels = {"command": "run", "job_name": "j", "action": "CreatePullToPushGroup", "code": "other"}
    assert m.registry.get_sample_value("worker_requests_total", labels) == 1


def test_a_failed_run_keeps_the_previous_last_success(tmp_path: Path) -> None:
    """The alert keeps working: a run that does not succeed carries the old success time."""
    path = tmp_path / "sync.prom"
    first = Metrics(command="sync", job_name="nightly")
    first.finish(duration_s=3, success=True, now=1000.0)
    first.write_textfile(path)

    second = busy_run()
    second.write_textfile(path)  # during the run: the old success is already there
    assert value(path.read_text(), LAST_SUCCESS) == 1000.0
    second.finish(duration_s=4, success=False, now=2000.0)
    second.write_textfile(path)
    text = path.read_text()
    assert value(text, LAST_SUCCESS) == 1000.0
    assert value(text, "worker_last_finish_timestamp_seconds") == 2000.0

    third = Metrics(command="sync", job_name="nightly")
    third.finish(duration_s=1, success=True, now=3000.0)
    third.write_textfile(path)
    assert value(path.read_text(), LAST_SUCCESS) == 3000.0


def test_last_success_is_not_taken_from_another_job(tmp_path: Path) -> None:
    """Only the same command and job_name carry over; no file or a damaged file gives none."""
    path = tmp_path / "x.prom"
    other = Metrics(command="run", job_name="migration")
    other.finish(duration_s=1, success=True, now=500.0)
    other.write_textfile(path)
    assert previous_last_success(path, command="sync", job_name="nightly") is None
    assert previous_last_success(path, command="run", job_name="migration") == 500.0
    assert (
        previous_last_success(tmp_path / "none.prom", command="run", job_name="migration") is None
    )
    path.write_bytes(b"\xff\xfe not metrics {{{\n")
    assert previous_last_success(path, command="run", job_name="migration") is None
    fresh = Metrics(command="run", job_name="migration")
    fresh.write_textfile(path)  # a damaged old file does not stop the write
    assert value(path.read_text(), LAST_SUCCESS, command="run", job_name="migration") is None


def test_textfile_write_is_atomic(tmp_path: Path) -> None:
    """A reader polling the file while it is rewritten always sees a whole exposition."""
    path = tmp_path / "sync.prom"
    m = busy_run()
    for i in range(200):  # a big file: many series, so a torn write would be visible
        m.request("CreatePullToPushGroup", f"Code{i}")
    m.write_textfile(path)
    whole = path.read_text()
    stop = threading.Event()
    seen: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            seen.append(path.read_text())

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(30):
            m.write_textfile(path)
    finally:
        stop.set()
        thread.join()
    assert seen and all(text == whole for text in seen)
    assert sorted(os.listdir(tmp_path)) == ["sync.prom"]  # no temporary file left behind


def test_an_unwritable_textfile_raises_oserror(tmp_path: Path) -> None:
    """A missing directory is an OSError for the caller to log; nothing is left behind."""
    with pytest.raises(OSError):
        busy_run().write_textfile(tmp_path / "missing" / "sync.prom")


def test_metrics_are_served_on_loopback_while_the_block_runs() -> None:
    """GET /metrics answers during the block, on 127.0.0.1; after it the port is closed."""
    m = busy_run()
    with m.serve(0) as url:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        m.throttle()
        with urllib.request.urlopen(url, timeout=10) as resp:
            later = resp.read().decode()
    assert value(text, "worker_throttles_total") == 1
    assert value(later, "worker_throttles_total") == 2  # live values, not a snapshot
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)
    with socket.socket() as probe:  # no listener is left: the server socket was closed
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT only
        probe.bind(("127.0.0.1", port))
        probe.listen()


def test_a_taken_port_is_a_usage_error() -> None:
    """--metrics-port on a port in use fails before the run with exit 2, naming the port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UsageError) as caught, Metrics(command="run", job_name="j").serve(port):
            pass
    assert str(caught.value).startswith(f"--metrics-port {port}: cannot listen on 127.0.0.1:")


def test_made_up_codes_all_count_as_other() -> None:
    """Many distinct codes a server makes up land in one 'other' series, counted each time."""
    m = Metrics(command="run", job_name="j")
    for i in range(1000):
        m.request("CreatePullToPushGroup", f"bad code {i}")
    m.request("CreatePullToPushGroup", "OK")
    m.request("CreatePullToPushGroup", "OK")
    labels = {"command": "run", "job_name": "j", "action": "CreatePullToPushGroup"}
    get = m.registry.get_sample_value
    assert get("worker_requests_total", {**labels, "code": "other"}) == 1000
    assert get("worker_requests_total", {**labels, "code": "OK"}) == 2
