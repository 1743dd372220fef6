"""Each deploy recipe run the way its scheduler would run it: the recipe's arguments, job file,
environment, working directory, non-root user and state directory set up as the recipe sets
it up, against the sandbox; the exit code is the one expected, and the recipe's own policy
(read from the recipe) treats it as docs/contract.md's table says.

What differs from production, and why: the paths are moved under one temporary root (the
recipe's absolute paths are rewritten, nothing else); WORKER_ENDPOINT points at the sandbox
(no recipe names an endpoint, so the default would be the real service); the interpreter is
one a non-root user may execute (this machine's venv Python lives under /root, mode 0700),
with the venv's packages on PYTHONPATH."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import AK, SK, Gateway, SandboxProc, names, write_manifest
from tests.test_deploy import (
    DEPLOY,
    NEVER_RETRY,
    RETRY_SOON,
    ROOT,
    k8s_verdict,
    systemd_verdict,
    unit_entries,
)
from worker.ledger.lock import lock_path

pytestmark = pytest.mark.slow

K8S_UID = K8S_GID = 10001  # the CronJob's runAsUser/runAsGroup/fsGroup (and the image's user)
SYSTEMD_UID = SYSTEMD_GID = 64010  # stands for the uid systemd-sysusers gives live-groups


def interpreter() -> tuple[str, dict[str, str]]:
    """A Python 3.x (same minor) that any user may execute, and the environment that lets it
    import the worker and its dependencies from this checkout and venv."""
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [
        os.path.realpath(sys.executable),
        f"/usr/bin/python{minor}",
        f"/usr/local/bin/python{minor}",
    ]
    for exe in candidates:
        if os.path.exists(exe) and _others_may_run(Path(exe)):
            site = sysconfig.get_paths()["purelib"]
            return exe, {"PYTHONPATH": f"{ROOT}{os.pathsep}{site}"}
    pytest.fail(
        f"no Python {minor} that a non-root user may execute among {candidates} "
        "(Debian: apt-get install python3-minimal)"
    )


def _others_may_run(path: Path) -> bool:
    parts = [path, *path.parents]
    return all(p.stat().st_mode & stat.S_IXOTH for p in parts)


@pytest.fixture
def root() -> Iterator[Path]:
    """A scratch root that other users can traverse (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="recipes-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def own(path: Path, uid: int, gid: int, mode: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    path.chmod(mode)
    return path


def remap(text: str, moves: dict[str, Path]) -> str:
    """Replace each production path by its test stand-in, longest first and in one pass, so
    a path already moved (/var/lib/prometheus/...) is not moved again by a shorter prefix."""
    pattern = re.compile("|".join(re.escape(k) for k in sorted(moves, key=len, reverse=True)))
    return pattern.sub(lambda m: str(moves[m.group(0)]), text)


def run_as(
    cmd: list[str],
    *,
    uid: int,
    gid: int,
    env: dict[str, str],
    cwd: Path,
    extra_groups: list[int] | None = None,
    umask: int = 0o022,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        user=uid,
        group=gid,
        extra_groups=extra_groups or [],
        umask=umask,
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}"


def last_success(prom: Path) -> float | None:
    for family in text_string_to_metric_families(prom.read_text()):
        for sample in family.samples:
            if sample.name == "worker_last_success_timestamp_seconds":
                return sample.value
    return None


def created_names(sb: SandboxProc) -> set[str]:
    return {a["name"] for a in sb.creates() if a["status"] == 200}


# -- systemd -------------------------------------------------------------------------------------


def test_systemd_unit_run_as_its_user_in_its_state_directory(
    root: Path, sandbox_factory: Any
) -> None:
    """live-groups-sync.service: ExecStart as the live-groups user, in StateDirectory with its
    mode and the unit's UMask, EnvironmentFile credentials: exit 0 (success), the ledger and
    the metrics file written; then a rejected line: exit 1, which the unit does not restart."""
    sb: SandboxProc = sandbox_factory("--forbid", "^禁")
    unit = unit_entries(DEPLOY / "systemd" / "live-groups-sync.service")
    uid, gid = SYSTEMD_UID, SYSTEMD_GID
    state_root = root / "var" / "lib"
    moves = {
        "/etc/live-groups": root / "etc" / "live-groups",
        "/var/lib/prometheus/node-exporter": state_root / "prometheus" / "node-exporter",
        "%S": state_root,
        "/var/lib": state_root,
    }
    # Set-up steps (docs/nightly-sync.md, systemd): /etc/live-groups holds the job, the manifest and the
    # credentials (root, 0600); the textfile directory is writable for live-groups.
    etc = own(moves["/etc/live-groups"], 0, 0, 0o755)
    (etc / "nightly-sync.toml").write_text(
        remap((DEPLOY / "systemd" / "nightly-sync.toml").read_text(), moves)
    )
    manifest = write_manifest(etc / "groups.jsonl", names(4, "系统"))
    credentials = etc / "credentials.env"
    credentials.write_text(f"VOLC_ACCESSKEY={AK}\nVOLC_SECRETKEY={SK}\n")
    credentials.chmod(0o600)
    textfile = own(moves["/var/lib/prometheus/node-exporter"], uid, gid, 0o755)
    # What systemd does: StateDirectory= owned by the user, StateDirectoryMode=.
    state = own(
        state_root / unit["Service.StateDirectory"][0],
        uid,
        gid,
        int(unit["Service.StateDirectoryMode"][0], 8),
    )
    assert unit["Service.WorkingDirectory"] == ["%S/live-groups"]
    env_file = Path(remap(unit["Service.EnvironmentFile"][0], moves))
    exe, py_env = interpreter()
    env = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": str(state),
        "USER": "live-groups",
        "LOGNAME": "live-groups",
        "STATE_DIRECTORY": str(state),
        "WORKER_ENDPOINT": sb.url,
        **py_env,
    }
    env.update(
        line.partition("=")[::2] for line in env_file.read_text().splitlines() if "=" in line
    )
    exec_start = shlex.split(remap(unit["Service.ExecStart"][0], moves))
    assert exec_start[0] == "/opt/live-groups/.venv/bin/worker"
    cmd = [exe, "-m", "worker", *exec_start[1:]]
    umask = int(unit["Service.UMask"][0], 8)

    first = run_as(cmd, uid=uid, gid=gid, env=env, cwd=state, umask=umask)
    assert first.returncode == 0, explain(first)
    assert systemd_verdict(unit, first.returncode) == "success"
    assert created_names(sb) == {g["Name"] for g in names(4, "系统")}
    ledger = state / "groups.ledger.jsonl"
    assert ledger.stat().st_uid == uid and stat.S_IMODE(ledger.stat().st_mode) & 0o007 == 0
    prom = textfile / "live-groups-sync.prom"
    assert prom.exists(), explain(first)
    success = last_success(prom)
    assert success is not None

    write_manifest(manifest, [*names(4, "系统"), {"Name": "禁止01", "ProjectName": "default"}])
    second = run_as(cmd, uid=uid, gid=gid, env=env, cwd=state, umask=umask)
    assert second.returncode == 1, explain(second)
    assert systemd_verdict(unit, second.returncode) == "failed"  # no restart: fix the manifest
    assert last_success(prom) == success  # the alert still sees the last good night


# -- Kubernetes ----------------------------------------------------------------------------------


def configmap_volume(mount: Path, files: dict[str, str]) -> None:
    """Lay out files as the kubelet projects a ConfigMap: a timestamped directory, `..data`
    pointing at it, and each key a symbolic link through `..data`; all root-owned, 0644."""
    own(mount, 0, 0, 0o755)
    data = own(mount / "..2026_11_29_02_15_00.000000001", 0, 0, 0o755)
    for name, text in files.items():
        (data / name).write_text(text, encoding="utf-8")
        (data / name).chmod(0o644)
        (mount / name).symlink_to(Path("..data") / name)
    (mount / "..data").symlink_to(data.name)


def test_cronjob_pod_as_its_security_context_with_the_pvc(
    root: Path, sandbox_factory: Any, gateway: Gateway
) -> None:
    """The CronJob's container: its args, the ConfigMap mount, the PVC as fsGroup makes it
    (root-owned, group fsGroup, setgid), runAsUser/runAsGroup and fsGroup as a supplementary
    group, the Secret as environment, WORKDIR /state: exit 0, its metrics pushed to the job
    file's Pushgateway (a recorder on loopback stands in for the cluster's); then a wrong
    secret: the server refuses the run (exit 7) and the podFailurePolicy fails the Job."""
    sb: SandboxProc = sandbox_factory()
    (doc,) = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "cronjob.yaml").read_text()) if d]
    job_spec = doc["spec"]["jobTemplate"]["spec"]
    pod = job_spec["template"]["spec"]
    (container,) = pod["containers"]
    ctx = pod["securityContext"]
    uid, gid, fs_group = ctx["runAsUser"], ctx["runAsGroup"], ctx["fsGroup"]
    assert (uid, gid) == (K8S_UID, K8S_GID)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    moves = {mounts["config"]: root / "config", mounts["state"]: root / "state"}
    job_toml = (DEPLOY / "k8s" / "job.toml").read_text()
    pushgateway = tomllib.loads(job_toml)["metrics-push"]
    job_toml = job_toml.replace(pushgateway, gateway.url)  # never the cluster's address
    manifest_text = "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in names(3, "集群"))
    configmap_volume(
        moves[mounts["config"]], {"job.toml": remap(job_toml, moves), "groups.jsonl": manifest_text}
    )
    # A PVC with fsGroup: the kubelet makes it group fsGroup, group-writable, setgid.
    state = own(moves[mounts["state"]], 0, fs_group, 0o2775)
    home = own(root / "home" / "worker", uid, gid, 0o755)  # the image's home directory
    exe, py_env = interpreter()
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOSTNAME": "live-groups-sync-28870935-x7k2p",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",  # the image's ENV
        "VOLC_ACCESSKEY": AK,
        "VOLC_SECRETKEY": SK,  # envFrom: the Secret
        "WORKER_ENDPOINT": sb.url,
        **py_env,
    }
    env.update({e["name"]: e["value"] for e in container["env"]})
    env["HOME"] = str(home)
    args = [remap(a, moves) for a in container["args"]]
    cmd = [exe, "-m", "worker", *args]

    first = run_as(cmd, uid=uid, gid=gid, extra_groups=[fs_group], env=env, cwd=state)
    assert first.returncode == 0, explain(first)
    assert k8s_verdict(job_spec, first.returncode) == "success"
    assert created_names(sb) == {g["Name"] for g in names(3, "集群")}
    ledger = state / "groups.ledger.jsonl"
    assert ledger.stat().st_uid == uid and ledger.stat().st_gid == fs_group  # setgid dir
    pushed = [(m, p) for m, p, body in gateway.received if "worker_" in body]
    assert ("POST", "/metrics/job/worker/command/sync/job_name/job") in pushed, gateway.received

    env["VOLC_SECRETKEY"] = "not-the-secret"
    second = run_as(cmd, uid=uid, gid=gid, extra_groups=[fs_group], env=env, cwd=state)
    assert second.returncode == 7, explain(second)
    assert second.returncode in NEVER_RETRY and k8s_verdict(job_spec, second.returncode) == "fail"
    assert "not-the-secret" not in second.stdout + second.stderr


# -- compose -------------------------------------------------------------------------------------


def compose_worker(
    root: Path, redis_url: str, sb: SandboxProc
) -> tuple[list[str], dict[str, str], Path, Path]:
    """worker-0 of deploy/compose.yaml: (command, environment, /jobs, /state) moved to `root`."""
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    svc = doc["services"]["worker-0"]
    uid, gid = (int(x) for x in svc["user"].split(":"))
    assert (uid, gid) == (K8S_UID, K8S_GID)
    jobs = own(root / "jobs", 0, 0, 0o755)  # ../jobs mounted read-only
    shutil.copy(ROOT / "jobs" / "migration.toml", jobs / "migration.toml")
    state = own(root / "state", uid, gid, 0o750)  # the named volume starts as the image's /state
    moves = {"/jobs": jobs, "/state": state}
    # The image's `worker` console script, for worker-retry to find on PATH.
    exe, py_env = interpreter()
    bin_dir = own(root / "bin", 0, 0, 0o755)
    (bin_dir / "worker").write_text(f'#!/bin/sh\nexec {exe} -m worker "$@"\n')
    (bin_dir / "worker").chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
        "HOME": "/home/worker",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        **py_env,
    }
    for key, value in svc["environment"].items():
        value = re.sub(r"\$\{VOLC_ACCESSKEY[^}]*\}", AK, value)
        value = re.sub(r"\$\{VOLC_SECRETKEY[^}]*\}", SK, value)
        value = re.sub(r"\$\{VOLC_SESSION_TOKEN:-\}", "", value)
        env[key] = value
    assert env["WORKER_LIMITER"] == "redis://redis:6379/0"
    env["WORKER_LIMITER"] = redis_url  # the compose service `redis`
    env["WORKER_ENDPOINT"] = sb.url
    assert svc["entrypoint"] == ["worker-retry"]
    cmd = ["sh", str(DEPLOY / "worker-retry"), *(remap(a, moves) for a in svc["command"])]
    return cmd, env, jobs, state


@pytest.fixture
def redis_url() -> str:
    import redis

    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(url, socket_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.fail(f"compose's recipe shares its budget through Redis; none at {url}: {exc}")
    return url


def test_compose_worker_runs_once_on_success_and_on_codes_a_retry_cannot_fix(
    root: Path, sandbox_factory: Any, redis_url: str
) -> None:
    """worker-0 through worker-retry as the image's user, ledger on the named volume, the
    shared limiter: exit 0 once; a manifest error (2) is not retried."""
    sb: SandboxProc = sandbox_factory()
    cmd, env, jobs, state = compose_worker(root, redis_url, sb)
    write_manifest(jobs / "part-00.jsonl", names(3, "组合"))
    done = run_as(cmd, uid=K8S_UID, gid=K8S_GID, env=env, cwd=state)
    assert done.returncode == 0, explain(done)
    assert "worker-retry:" not in done.stderr
    assert created_names(sb) == {g["Name"] for g in names(3, "组合")}
    assert (state / "part-00.ledger.jsonl").stat().st_uid == K8S_UID
    assert last_success(state / "part-00.prom") is not None

    (jobs / "part-00.jsonl").write_text('{"Name": "bad name!"}\n')
    bad = run_as(cmd, uid=K8S_UID, gid=K8S_GID, env=env, cwd=state)
    assert bad.returncode == 2 and bad.returncode in NEVER_RETRY, explain(bad)
    assert "worker-retry:" not in bad.stderr  # ran once: a retry would send the same file


def test_compose_worker_retries_a_held_ledger_a_bounded_number_of_times(
    root: Path, sandbox_factory: Any, redis_url: str
) -> None:
    """Another run holds the ledger (exit 5, retry soon): worker-retry runs the worker again,
    WORKER_RETRY_TRIES times in all, then exits 5 for the scheduler; nothing was sent."""
    sb: SandboxProc = sandbox_factory()
    cmd, env, jobs, state = compose_worker(root, redis_url, sb)
    write_manifest(jobs / "part-00.jsonl", names(2, "锁定"))
    env.update(WORKER_RETRY_TRIES="3", WORKER_RETRY_PAUSE="0")  # the recipe says 5 and 60 s
    held = lock_path(state / "part-00.ledger.jsonl")
    fd = os.open(held, os.O_RDWR | os.O_CREAT, 0o640)
    os.fchown(fd, K8S_UID, K8S_GID)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_as(cmd, uid=K8S_UID, gid=K8S_GID, env=env, cwd=state)
    finally:
        os.close(fd)
    assert result.returncode == 5 and result.returncode in RETRY_SOON, explain(result)
    assert re.findall(r"worker-retry: exit 5 .* run (\d) of 3", result.stderr) == ["2", "3"]
    assert sb.creates() == []


def test_job_files_in_jobs_are_accepted_by_the_cli(tmp_path: Path, sandbox_factory: Any) -> None:
    """jobs/nightly-sync.toml and jobs/migration.toml run as shipped (their manifest is the
    example one) against the sandbox: both exit 0 and create the 12 example groups."""
    sb: SandboxProc = sandbox_factory()
    jobs = tmp_path / "jobs"
    shutil.copytree(ROOT / "jobs", jobs, ignore=shutil.ignore_patterns("*.ledger.jsonl*", "*.idx*"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOLC_", "WORKER_"))}
    env.update(VOLC_ACCESSKEY=AK, VOLC_SECRETKEY=SK, WORKER_ENDPOINT=sb.url, HOME=str(tmp_path))
    for job in ("migration.toml", "nightly-sync.toml"):
        command = tomllib.loads((jobs / job).read_text())["command"]
        result = subprocess.run(
            [sys.executable, "-m", "worker", command, "--job", str(jobs / job)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, f"{job}: {explain(result)}"
    assert len(created_names(sb)) == 12
