"""Unattended runs end to end: job files, option precedence and metrics through the real CLI.

Every test runs `python -m worker` as a process against the sandbox process on loopback; the
ledger the worker wrote, the metrics it exposed and the sandbox's arrival log are compared
with each other, never with the worker's own account of itself.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    AK,
    SK,
    SandboxProc,
    cli_env,
    ledger_records,
    names,
    run_worker,
    worker_cmd,
    write_manifest,
)

pytestmark = pytest.mark.slow  # real processes: `pytest -m 'not slow'` skips them

WRITES = ("CreatePullToPushGroup", "UpdatePullToPushGroup", "DeletePullToPushGroup")
MAX_SCRAPE = 1 << 20  # a /metrics page is a few KiB


# -- helpers ------------------------------------------------------------------------------


def free_port() -> int:
    """A port nothing listens on right now (the kernel's pick for port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def twin_sandboxes(sandbox_factory: Any, *args: str) -> tuple[SandboxProc, Any]:
    """A sandbox on a fixed port, and a function that stops it and starts a fresh one (same
    arguments, same port, so the same endpoint URL) for the second of two runs to compare."""
    port = str(free_port())
    first: SandboxProc = sandbox_factory("--port", port, *args)

    def again() -> SandboxProc:
        first.stop()
        second: SandboxProc = sandbox_factory("--port", port, *args)
        assert second.url == first.url
        return second

    return first, again


def last_run(ledger: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """The last run in `ledger`: its header, its result records and its footer."""
    records = ledger_records(ledger)
    start = max(i for i, r in enumerate(records) if r["type"] == "run")
    header, rest = records[start], records[start + 1 :]
    results = [r for r in rest if r["type"] == "result"]
    footers = [r for r in rest if r["type"] == "end"]
    assert len(footers) == 1, rest
    return header, results, footers[0]


def outcomes(results: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What each item came to, in a form two runs can be compared by."""
    return sorted(
        (r["line"], r["name"] or "", r["action"] or "", r["outcome"], r["code"]) for r in results
    )


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus text exposition, parsed by prometheus_client's parser."""
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def by_labels(text: str, name: str, *keys: str) -> dict[tuple[str, ...], float]:
    """Sample values of `name`, keyed by the values of `keys` among their labels."""
    return {
        tuple(labels[k] for k in keys): value
        for sample, labels, value in samples(text)
        if sample == name
    }


def one(text: str, name: str) -> float:
    """The value of a metric that has exactly one series in `text`."""
    values = [value for sample, _, value in samples(text) if sample == name]
    assert len(values) == 1, (name, values)
    return values[0]


def scrape(port: int) -> str | None:
    """GET /metrics on 127.0.0.1:`port` (no redirects, bounded read); None if nothing
    listens, or the server closed the connection (the run ended during the scrape)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read(MAX_SCRAPE + 1)
        assert resp.status == 200 and len(body) <= MAX_SCRAPE, (resp.status, len(body))
        return body.decode("utf-8")
    except (ConnectionRefusedError, ConnectionResetError):  # RemoteDisconnected is one too
        return None
    finally:
        conn.close()


def write_job(path: Path, body: str) -> Path:
    path.write_text(body, encoding="utf-8")
    return path


# -- 1. a job file is the same run as its flags ---------------------------------------------


def test_a_run_job_file_records_the_same_settings_and_outcomes_as_its_flags(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """`run --job job.toml` and `run MANIFEST --same --options` write the same header settings
    (each differing from the defaults), the same plan and the same outcome for every line."""
    first, again = twin_sandboxes(sandbox_factory, "--rate", "50", "--forbid", "^禁")
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    groups = [*names(12), {"Name": "禁止01", "ProjectName": "default"}, {"Name": "bad name!"}]
    manifest = write_manifest(jobs / "m.jsonl", groups)
    options = {
        "region": "cn-north-1",
        "rate": "40",
        "concurrency": "6",
        "max-attempts": "5",
        "item-deadline": "120",
        "timeout": "5",
        "grace": "3",
    }
    env = cli_env(tmp_path)

    flags = [a for k, v in options.items() for a in (f"--{k}", v)]
    by_flags = run_worker(
        "run", str(manifest), "--ledger", str(tmp_path / "flags.ledger.jsonl"),
        "--endpoint", first.url, "--skip-invalid", *flags, env=env,
    )  # fmt: skip
    assert by_flags.returncode == 1, by_flags.stderr  # a rejected and an invalid line

    second = again()
    typed = {"region": '"cn-north-1"'}
    job = write_job(
        jobs / "migrate.toml",
        '# the same run as a job; paths are relative to this file\ncommand = "run"\n'
        'manifest = "m.jsonl"\nledger = "job.ledger.jsonl"\n'
        f'endpoint = "{second.url}"\nskip-invalid = true\n'
        + "".join(f"{k} = {typed.get(k, v)}\n" for k, v in options.items()),
    )
    by_job = run_worker("run", "--job", str(job), env=env)
    assert by_job.returncode == 1, by_job.stderr
    assert not (jobs / "m.ledger.jsonl").exists()  # the job's ledger, not the default

    f_header, f_results, f_footer = last_run(tmp_path / "flags.ledger.jsonl")
    j_header, j_results, j_footer = last_run(jobs / "job.ledger.jsonl")
    assert f_header["settings"] == j_header["settings"]
    assert j_header["settings"] | {"endpoint": ""} == {
        "endpoint": "", "region": "cn-north-1", "rate": 40.0,
        "headroom": j_header["settings"]["headroom"], "concurrency": 6, "max_attempts": 5,
        "item_deadline_s": 120.0, "timeout_s": 5.0, "skip_invalid": True, "limiter": None,
    }  # fmt: skip
    assert j_header["settings"]["endpoint"] == second.url
    for key in ("manifest", "manifest_sha256", "items", "plan", "command"):
        assert f_header[key] == j_header[key], key
    assert outcomes(f_results) == outcomes(j_results)
    assert Counter(r["outcome"] for r in j_results) == {"created": 12, "rejected": 1, "invalid": 1}
    assert f_footer["outcomes"] == j_footer["outcomes"]
    assert f_footer["exit_code"] == j_footer["exit_code"] == 1
    assert len(first.creates()) == len(second.creates()) == 13


# -- 2. command line > job file > environment ------------------------------------------------


def test_flag_beats_job_file_beats_environment(sandbox_factory: Any, tmp_path: Path) -> None:
    """WORKER_* variables fill what nothing else gives, a job file overrides them, a flag
    overrides both: seen in the header settings and in which ledger file gets written."""
    sb: SandboxProc = sandbox_factory("--rate", "50")
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    manifest = write_manifest(jobs / "m.jsonl", names(4))
    job = write_job(
        jobs / "nightly.toml",
        'command = "run"\nmanifest = "m.jsonl"\nledger = "job.ledger.jsonl"\n'
        "rate = 20\nmax-attempts = 4\n",
    )
    env_ledger, job_ledger = tmp_path / "env.ledger.jsonl", jobs / "job.ledger.jsonl"
    flag_ledger = tmp_path / "flag.ledger.jsonl"
    env = cli_env(tmp_path) | {
        "WORKER_ENDPOINT": sb.url,
        "WORKER_RATE": "7",
        "WORKER_MAX_ATTEMPTS": "3",
        "WORKER_CONCURRENCY": "5",
        "WORKER_TIMEOUT": "9",
        "WORKER_LEDGER": str(env_ledger),
    }

    # flag (rate) > job (max-attempts, ledger) > environment (concurrency, timeout, endpoint)
    out = run_worker("run", "--job", str(job), "--rate", "30", env=env)
    assert out.returncode == 0, out.stderr
    assert job_ledger.exists() and not env_ledger.exists() and not flag_ledger.exists()
    settings = last_run(job_ledger)[0]["settings"]
    assert (settings["rate"], settings["max_attempts"]) == (30.0, 4)
    assert (settings["concurrency"], settings["timeout_s"]) == (5, 9.0)
    assert settings["endpoint"] == sb.url

    # a --ledger flag beats the job file's ledger; the job's rate beats WORKER_RATE
    out = run_worker("run", "--job", str(job), "--ledger", str(flag_ledger), env=env)
    assert out.returncode == 0, out.stderr
    assert not env_ledger.exists()
    assert len([r for r in ledger_records(job_ledger) if r["type"] == "run"]) == 1
    settings = last_run(flag_ledger)[0]["settings"]
    assert (settings["rate"], settings["max_attempts"], settings["concurrency"]) == (20.0, 4, 5)

    # no job file: the environment alone, WORKER_LEDGER included
    out = run_worker("run", str(manifest), env=env)
    assert out.returncode == 0, out.stderr
    settings = last_run(env_ledger)[0]["settings"]
    assert (settings["rate"], settings["max_attempts"], settings["timeout_s"]) == (7.0, 3, 9.0)
    assert len([r for r in ledger_records(job_ledger) if r["type"] == "run"]) == 1
    # Each run had a new ledger, so each sent every create; the later ones were told Exist.
    assert Counter(a["code"] for a in sb.creates()) == {"": 4, "RequestLimitExceeded.Exist": 8}
    assert all(g["created"] == 1 for g in sb.groups().values())


# -- 3. bad job files ---------------------------------------------------------------------

SECRET_IN_FILE = "s3cr3t-VALUE-in-the-job-file"

BAD_JOBS = {
    "unknown key": ("rat = 5\n", "rat: unknown key (did you mean rate?)"),
    "wrong type": ('rate = "fast"\n', "rate: must be a number, not a string"),
    "credential key": (f'secret_key = "{SECRET_IN_FILE}"\n', "secret_key: looks like a credential"),
    "credential in a table": (
        f'[auth]\naccess_key = "{SECRET_IN_FILE}"\n',
        "access_key: looks like a credential",
    ),
    "wrong command": ("max-delete = 5\n", "command: this job is for 'sync', not 'run'"),
    "TOML syntax": ("rate = = 5\n", "not valid TOML: Invalid value"),
}


@pytest.mark.parametrize("case", list(BAD_JOBS))
def test_a_bad_job_file_exits_2_naming_file_line_and_key_and_sends_nothing(
    sandbox_factory: Any, tmp_path: Path, case: str
) -> None:
    """Unknown key, wrong type, credential-looking key, a sync job given to `run`, a TOML
    syntax error: exit 2, FILE:LINE: KEY in the message, no arrival, no ledger, no secret."""
    sb: SandboxProc = sandbox_factory("--rate", "50")
    write_manifest(tmp_path / "m.jsonl", names(3))
    line, expected = BAD_JOBS[case]
    command = "sync" if case == "wrong command" else "run"
    # The faulty key is on line 5 (or, in a table, 6): the message must point at it.
    job = write_job(
        tmp_path / "bad.toml",
        f'# a job with one mistake\ncommand = "{command}"\nmanifest = "m.jsonl"\n'
        f"concurrency = 4\n{line}",
    )
    bad_line = 6 if case == "credential in a table" else 5
    if case == "wrong command":
        bad_line = 2
    out = run_worker("run", "--job", str(job), "--endpoint", sb.url, env=cli_env(tmp_path))
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert f"error: {job}:{bad_line}: {expected}" in out.stderr, out.stderr
    assert sb.arrivals() == []
    assert not (tmp_path / "m.ledger.jsonl").exists()
    for secret in (SK, SECRET_IN_FILE):
        assert secret not in out.stdout + out.stderr


# -- 4. the metrics file agrees with the ledger and the sandbox ------------------------------


def test_metrics_file_after_a_run_with_faults_agrees_with_ledger_and_sandbox(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """After 60 groups through 20% faults (5% ambiguous) the .prom file parses; items per
    (action, outcome) equal the run's results, requests equal the footer's and the sandbox's
    arrivals, last success is set on exit 0; a failed rerun keeps that success time."""
    sb: SandboxProc = sandbox_factory(
        "--rate", "50", "--fault-rate", "0.2", "--ambiguous-rate", "0.05", "--seed", "4",
        "--hang", "3", "--forbid", "^禁",
    )  # fmt: skip
    groups = names(60)
    manifest = write_manifest(tmp_path / "groups.jsonl", groups)
    prom = tmp_path / "groups.prom"
    env = cli_env(tmp_path)
    argv = ("run", str(manifest), "--endpoint", sb.url, "--rate", "50", "--timeout", "1.5",
            "--metrics-file", str(prom))  # fmt: skip
    out = run_worker(*argv, env=env)
    assert out.returncode == 0, out.stderr
    ledger = tmp_path / "groups.ledger.jsonl"
    _, results, footer = last_run(ledger)
    text = prom.read_text(encoding="utf-8")

    series = samples(text)
    assert {labels["job_name"] for _, labels, _ in series} == {"groups"}
    assert {labels["command"] for _, labels, _ in series} == {"run"}
    items = by_labels(text, "worker_items_total", "action", "outcome")
    assert items == Counter((r["action"] or "none", r["outcome"]) for r in results)
    assert sum(items.values()) == 60
    requests = by_labels(text, "worker_requests_total", "code")
    arrivals = [a for a in sb.arrivals() if a["ak"] == AK]
    assert sum(requests.values()) == len(arrivals) == footer["requests"]
    assert requests == {(code,): float(n) for code, n in footer["codes"].items()}
    assert sum(v for (code,), v in requests.items() if code != "OK") >= 5  # faults happened
    assert one(text, "worker_retries_total") == footer["retries"] >= 5
    assert one(text, "worker_throttles_total") == footer["throttles"]
    assert one(text, "worker_rate_limit") == 50.0
    assert one(text, "worker_in_flight") == 0.0
    success = one(text, "worker_last_success_timestamp_seconds")
    assert success == one(text, "worker_last_finish_timestamp_seconds")
    assert success >= one(text, "worker_run_start_timestamp_seconds") > 0

    # The same job again with a refused name: exit 1, and the alert's timestamp survives.
    write_manifest(manifest, [*groups, {"Name": "禁止01", "ProjectName": "default"}])
    before = len(arrivals)
    out = run_worker(*argv, env=env)
    assert out.returncode == 1, out.stderr
    _, results, footer = last_run(ledger)
    text = prom.read_text(encoding="utf-8")
    assert one(text, "worker_last_success_timestamp_seconds") == success
    assert one(text, "worker_last_finish_timestamp_seconds") > success
    assert by_labels(text, "worker_items_total", "action", "outcome") == {("create", "rejected"): 1}
    assert [r["outcome"] for r in results] == ["rejected"]
    requests = by_labels(text, "worker_requests_total", "code")
    new_arrivals = [a for a in sb.arrivals() if a["ak"] == AK][before:]
    assert sum(requests.values()) == len(new_arrivals) == footer["requests"] >= 1


# -- 5. /metrics while a run lasts ------------------------------------------------------------


def serving_run(sb: SandboxProc, tmp: Path, groups: int) -> tuple[subprocess.Popen[str], int, Path]:
    """`worker run` with --metrics-port on a free port, started, not waited for."""
    manifest = write_manifest(tmp / "live.jsonl", names(groups))
    port = free_port()
    errors = tmp / "worker-stderr.txt"
    with errors.open("w") as err:  # a file, not a pipe: the worker's logs must never block
        proc = subprocess.Popen(
            worker_cmd("run", str(manifest), "--endpoint", sb.url, "--rate", "10",
                       "--metrics-port", str(port)),
            env=cli_env(tmp), stdout=subprocess.DEVNULL, stderr=err,
            stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
    return proc, port, errors


def scrapes_while_running(proc: subprocess.Popen[str], port: int) -> Iterator[str]:
    """Every /metrics page served while `proc` runs, polled every 50 ms (bounded in time)."""
    deadline = time.monotonic() + 60  # a bound on the loop, not a measurement
    while proc.poll() is None and time.monotonic() < deadline:
        page = scrape(port)
        if page is None:
            time.sleep(0.05)  # not listening yet (or closed already: the loop then ends)
            continue
        yield page


def ended(proc: subprocess.Popen[str], errors: Path) -> None:
    """Wait for the worker (exit 0 expected); kill it if the test failed before that."""
    try:
        assert proc.wait(timeout=60) == 0, errors.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_metrics_are_served_while_the_run_lasts_and_not_after(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """`--metrics-port` serves /metrics during the run, with requests counted as they go
    (labelled with the job's name), and the port is closed once the worker has exited."""
    sb: SandboxProc = sandbox_factory("--rate", "50", "--latency-ms", "200-300")
    proc, port, errors = serving_run(sb, tmp_path, 40)
    try:
        seen = 0.0
        for page in scrapes_while_running(proc, port):
            seen = sum(by_labels(page, "worker_requests_total", "action", "code").values())
            if seen > 0:
                assert {labels["job_name"] for _, labels, _ in samples(page)} == {"live"}
                break
        assert seen > 0, errors.read_text()
    finally:
        ended(proc, errors)
    assert f"http://127.0.0.1:{port}/metrics" in errors.read_text()  # metrics.serving
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert len(sb.creates()) == 40


def test_served_metrics_show_the_rate_limit_from_the_first_scrape(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """worker_rate_limit is --rate on every page served, the first one included (a scrape
    in a run's first second must not read a limit of 0)."""
    sb: SandboxProc = sandbox_factory("--rate", "50", "--latency-ms", "200-300")
    proc, port, errors = serving_run(sb, tmp_path, 12)
    try:
        limits = [one(page, "worker_rate_limit") for page in scrapes_while_running(proc, port)]
    finally:
        ended(proc, errors)
    assert limits, errors.read_text()  # the run lasts over a second: it was scraped
    assert set(limits) == {10.0}, limits


# -- 6. a sync job is the same sync as its flags ---------------------------------------------


def tag(key: str, value: str) -> dict[str, str]:
    return {"Key": key, "Value": value, "Category": "Custom"}


ACCOUNT: list[dict[str, Any]] = [
    {"Name": "同步01", "ProjectName": "default", "Tags": [tag("a", "1")]},
    {"Name": "清理01", "ProjectName": "scratch"},
    {"Name": "清理02", "ProjectName": "scratch"},
    {"Name": "保留01", "ProjectName": "keep"},
]
MANIFEST: list[dict[str, Any]] = [
    {"Name": "同步01", "ProjectName": "default", "Tags": [tag("b", "2")]},
    {"Name": "新建01", "ProjectName": "default"},
    {"Name": "新建02", "ProjectName": "scratch"},
]


def test_a_sync_job_with_prune_and_scope_equals_its_flags(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """`sync --job` (prune, scope-project, max-delete) plans and does what the same flags do:
    same header, same results, same account afterwards; the job's max-delete is enforced."""
    preload = write_manifest(tmp_path / "account.jsonl", ACCOUNT)
    first, again = twin_sandboxes(sandbox_factory, "--rate", "50", "--preload", str(preload))
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    manifest = write_manifest(jobs / "m.jsonl", MANIFEST)
    env = cli_env(tmp_path)

    by_flags = run_worker(
        "sync", str(manifest), "--ledger", str(tmp_path / "flags.ledger.jsonl"),
        "--endpoint", first.url, "--rate", "50", "--prune", "--scope-project", "scratch",
        "--max-delete", "2", env=env,
    )  # fmt: skip
    assert by_flags.returncode == 0, by_flags.stderr
    account_after_flags = {n: g["Status"] for n, g in first.groups().items()}

    second = again()
    body = (
        'command = "sync"\nmanifest = "m.jsonl"\nledger = "job.ledger.jsonl"\n'
        f'endpoint = "{second.url}"\nrate = 50\nprune = true\nscope-project = ["scratch"]\n'
    )
    tight = write_job(jobs / "tight.toml", body + "max-delete = 1\n")
    refused = run_worker("sync", "--job", str(tight), env=env)
    assert refused.returncode == 2, refused.stderr  # 2 deletes > the job's max-delete of 1
    assert [a for a in second.arrivals() if a["action"] in WRITES] == []
    job = write_job(jobs / "nightly.toml", body + "max-delete = 2\n")
    by_job = run_worker("sync", "--job", str(job), env=env)
    assert by_job.returncode == 0, by_job.stderr

    f_header, f_results, f_footer = last_run(tmp_path / "flags.ledger.jsonl")
    j_header, j_results, j_footer = last_run(jobs / "job.ledger.jsonl")
    for key in ("command", "settings", "manifest", "manifest_sha256", "items", "plan"):
        assert f_header[key] == j_header[key], key
    assert j_header["settings"]["rate"] == 50.0
    assert outcomes(f_results) == outcomes(j_results)
    assert sorted((r["action"], r["name"], r["outcome"]) for r in j_results) == [
        ("create", "新建01", "created"), ("create", "新建02", "created"),
        ("delete", "清理01", "deleted"), ("delete", "清理02", "deleted"),
        ("update", "同步01", "updated"),
    ]  # fmt: skip
    assert f_footer["outcomes"] == j_footer["outcomes"]
    assert {n: g["Status"] for n, g in second.groups().items()} == account_after_flags
    assert account_after_flags["保留01"] == 0  # outside the scope: kept


def test_job_files_are_read_as_toml_not_json(tmp_path: Path) -> None:
    """A JSON job file is refused as TOML with its line (no silent reading of another format)."""
    job = tmp_path / "job.toml"
    job.write_text(json.dumps({"command": "run", "manifest": "m.jsonl"}), encoding="utf-8")
    out = run_worker("run", "--job", str(job), env=cli_env(tmp_path))
    assert out.returncode == 2, out.stderr
    assert f"error: {job}:1: not valid TOML" in out.stderr
