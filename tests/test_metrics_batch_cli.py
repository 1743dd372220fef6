"""Metrics a batch job can deliver, through the real CLI: --metrics-file checked before
anything is sent, --metrics-push to a Pushgateway (a recording server on loopback), every
sync's plan as a metric, and deploy/prometheus/alerts.yaml naming only exported metrics."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Gateway, SandboxProc, cli_env, names, run_worker, write_manifest
from worker.errors import UsageError
from worker.metrics_push import check_push_url

ALERTS = Path(__file__).parent.parent / "deploy" / "prometheus" / "alerts.yaml"


def values(text: str, name: str, key: str) -> dict[str, float]:
    """The samples of `name` by the value of their label `key`."""
    return {
        s.labels[key]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def one(text: str, name: str) -> float:
    found = [
        s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name
    ]
    assert len(found) == 1, (name, found)
    return found[0]


# -- --metrics-file: checked before anything is sent -------------------------------------------


@pytest.mark.slow
def test_a_metrics_file_in_a_missing_folder_is_exit_2_before_any_request(
    sandbox: SandboxProc, tmp_path: Path
) -> None:
    """Missing folder, a file as folder, a directory, (as non-root) a read-only folder: exit 2 naming the
    problem, and the sandbox's arrival log stays empty."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(2))
    env = cli_env(tmp_path)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = [
        (tmp_path / "nope" / "m.prom", "does not exist"),
        (a_file / "m.prom", "a folder in it is a file"),
        (tmp_path, "is a directory"),
    ]
    if os.geteuid() != 0:  # root writes anywhere: the probe would rightly succeed
        cases.append((read_only / "m.prom", "cannot create a file in"))
    for command in ("run", "sync"):
        for prom, said in cases:
            out = run_worker(
                command, str(manifest), "--endpoint", sandbox.url, "--metrics-file", str(prom),
                env=env,
            )  # fmt: skip
            assert out.returncode == 2, out.stderr
            assert "--metrics-file" in out.stderr and said in out.stderr, out.stderr
            assert "Traceback" not in out.stderr
    assert sandbox.arrivals() == []
    assert list(read_only.iterdir()) == []  # the probe file is gone


# -- every sync writes its plan ----------------------------------------------------------------


@pytest.mark.slow
def test_sync_check_writes_the_plan_and_the_check_time(
    sandbox: SandboxProc, tmp_path: Path
) -> None:
    """`sync --check --metrics-file F` (exit 6) writes worker_plan_items per action and
    worker_last_check_timestamp_seconds; after a sync (exit 0) the plan items are 0."""
    manifest = write_manifest(tmp_path / "nightly.jsonl", names(3))
    prom = tmp_path / "nightly.prom"
    env = cli_env(tmp_path)
    argv = (str(manifest), "--endpoint", sandbox.url, "--metrics-file", str(prom))
    check = run_worker("sync", *argv, "--check", env=env)
    assert check.returncode == 6, check.stderr
    text = prom.read_text()
    assert values(text, "worker_plan_items", "action") == {
        "create": 3.0, "update": 0.0, "delete": 0.0, "conflict": 0.0, "replace": 0.0,
    }  # fmt: skip
    checked = one(text, "worker_last_check_timestamp_seconds")
    assert checked > 0
    labels = {
        (s.labels["job_name"], s.labels["command"])
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert labels == {("nightly", "sync")}

    dry = run_worker("sync", *argv, "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert values(prom.read_text(), "worker_plan_items", "action")["create"] == 3.0

    synced = run_worker("sync", *argv, env=env)
    assert synced.returncode == 0, synced.stderr
    text = prom.read_text()
    assert set(values(text, "worker_plan_items", "action").values()) == {0.0}
    assert one(text, "worker_last_check_timestamp_seconds") >= checked
    success = one(text, "worker_last_success_timestamp_seconds")

    again = run_worker("sync", *argv, "--check", env=env)
    assert again.returncode == 0, again.stderr
    text = prom.read_text()
    assert set(values(text, "worker_plan_items", "action").values()) == {0.0}
    assert one(text, "worker_last_success_timestamp_seconds") == success  # a check keeps it


# -- --metrics-push ----------------------------------------------------------------------------


@pytest.mark.slow
def test_metrics_push_sends_the_run_to_the_gateway(
    sandbox: SandboxProc, gateway: Gateway, tmp_path: Path
) -> None:
    """`run --metrics-push URL` POSTs to /metrics/job/worker/command/run/job_name/<job>, the
    body holds the worker_ metrics, the last push has the success time; sync pushes its plan."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(3))
    env = cli_env(tmp_path)
    out = run_worker(
        "run", str(manifest), "--endpoint", sandbox.url, "--metrics-push", gateway.url, env=env
    )
    assert out.returncode == 0, out.stderr
    assert gateway.received, out.stderr
    method, path, body = gateway.received[-1]
    assert method == "POST"
    assert path == "/metrics/job/worker/command/run/job_name/m"
    assert values(body, "worker_items_total", "outcome") == {"created": 3.0}
    assert one(body, "worker_last_success_timestamp_seconds") > 0
    assert "metrics.push_failed" not in out.stderr

    check = run_worker(
        "sync", str(manifest), "--endpoint", sandbox.url, "--check",
        "--metrics-push", gateway.url, env=env,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    method, path, body = gateway.received[-1]
    assert (method, path) == ("POST", "/metrics/job/worker/command/sync/job_name/m")
    assert values(body, "worker_plan_items", "action")["create"] == 0.0
    assert one(body, "worker_last_check_timestamp_seconds") > 0


@pytest.mark.slow
def test_metrics_push_every_interval_while_the_run_lasts(
    sandbox: SandboxProc, gateway: Gateway, tmp_path: Path
) -> None:
    """With --metrics-push-interval 1 a run that lasts longer pushes before it ends."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(4))
    env = cli_env(tmp_path)
    out = run_worker(
        "run", str(manifest), "--endpoint", sandbox.url, "--rate", "1",
        "--metrics-push", gateway.url, "--metrics-push-interval", "1", env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    # 4 requests at 1/s take 3 s: at least one periodic push and the final one.
    assert len(gateway.received) >= 2
    assert {m for m, _, _ in gateway.received} == {"POST"}


@pytest.mark.slow
@pytest.mark.parametrize("answer", [500, 302])
def test_a_failed_push_warns_and_keeps_the_exit_code(
    sandbox: SandboxProc, gateway: Gateway, tmp_path: Path, answer: int
) -> None:
    """A gateway answering 500, or redirecting: exit 0 still, a warning on stderr naming the
    redacted URL; a redirect is not followed."""
    gateway.answer = answer
    manifest = write_manifest(tmp_path / "m.jsonl", names(1))
    out = run_worker(
        "run", str(manifest), "--endpoint", sandbox.url,
        "--metrics-push", gateway.url + "/prefix", env=cli_env(tmp_path),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "metrics.push_failed" in out.stderr and gateway.url in out.stderr
    assert [p for _, p, _ in gateway.received] == [
        "/prefix/metrics/job/worker/command/run/job_name/m"
    ]


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("ftp://gw:9091", "expected a Pushgateway"),
        ("http://user:hunter2@gw:9091", "remove the user:password@ part"),
        ("http://gw:9091/?token=hunter2", "only scheme, host, port and a path prefix"),
        ("http://gw:9091#x", "only scheme, host, port and a path prefix"),
        ("http://gw:0", "port 0"),
        ("http://gw:99999", "not a URL"),
        ("gw:9091", "expected a Pushgateway"),
        ("http://gw 9091", "spaces"),
    ],
)
def test_push_urls_are_checked_and_never_shown_with_a_secret(url: str, said: str) -> None:
    """A bad --metrics-push is refused naming the problem; its secrets are not in the message."""
    with pytest.raises(UsageError, match=re.escape(said)) as caught:
        check_push_url(url)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("url", ["http://pushgateway:9091", "https://gw.example/prefix/"])
def test_good_push_urls_pass(url: str) -> None:
    """Plain http to a private host is accepted (a Pushgateway usually lives there)."""
    check_push_url(url)


@pytest.mark.slow
def test_a_bad_push_url_is_exit_2_before_any_request(sandbox: SandboxProc, tmp_path: Path) -> None:
    """--metrics-push with a password: exit 2, nothing sent, the password not printed."""
    manifest = write_manifest(tmp_path / "m.jsonl", names(1))
    out = run_worker(
        "run", str(manifest), "--endpoint", sandbox.url,
        "--metrics-push", "http://u:hunter2@127.0.0.1:1", env=cli_env(tmp_path),
    )  # fmt: skip
    assert out.returncode == 2 and "--metrics-push" in out.stderr
    assert "hunter2" not in out.stderr + out.stdout
    assert sandbox.arrivals() == []


# -- the alert rules name exported metrics --------------------------------------------------------


def rule_metrics(expr: str) -> set[str]:
    """The metric names an expression reads (our metrics all start with worker_)."""
    return set(re.findall(r"\bworker_[a-z_]+", expr))


@pytest.mark.slow
def test_every_metric_the_alerts_name_is_exported(sandbox: SandboxProc, tmp_path: Path) -> None:
    """Each alert expression in deploy/prometheus/alerts.yaml names only metrics a real sync's
    textfile holds, and each alert has an expression, a summary and a severity."""
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {
        "WorkerNoSuccessfulSync", "WorkerDrift", "WorkerThrottled",
    }  # fmt: skip
    manifest = write_manifest(tmp_path / "m.jsonl", names(2))
    prom = tmp_path / "m.prom"
    out = run_worker(
        "sync", str(manifest), "--endpoint", sandbox.url, "--metrics-file", str(prom),
        env=cli_env(tmp_path),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    exported = {s.name for f in text_string_to_metric_families(prom.read_text()) for s in f.samples}
    for rule in rules:
        named = rule_metrics(rule["expr"])
        assert named, rule["alert"]
        assert named <= exported, (rule["alert"], named - exported)
        assert rule["annotations"]["summary"] and rule["labels"]["severity"]
