"""The deploy recipes, checked statically: official schemas and linters, and the exit-code
policy (docs/contract.md, Exit codes) as each scheduler would read it."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

from worker.errors import Exit

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
LARGE = DEPLOY / "k8s" / "large-manifest"  # the kustomize component for larger manifests
BIN = Path(sys.executable).parent  # the validators are test extras, installed in the venv

# The exit-code policy table of docs/contract.md, as sets a scheduler can apply.
SUCCESS = {0}
RETRY_SOON = {3, 4, 5}  # endpoint/limiter away or deferred; interrupted; ledger held
NEVER_RETRY = {1, 2, 6, 7, 70}  # a human must fix the manifest, job, credentials, clock, bug
GRACE_S = 10  # the worker's default --grace


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def tool(name: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    exe = BIN / name if (BIN / name).exists() else shutil.which(name)
    assert exe, f"{name} is not installed: pip install -e '.[test]'"
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def unit_entries(path: Path) -> dict[str, list[str]]:
    """A systemd unit file as `Section.Key -> [values]` (keys may repeat)."""
    entries: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return entries


# -- the policy itself -----------------------------------------------------------------------


def test_the_policy_covers_every_exit_code() -> None:
    """Every exit code the worker can return has exactly one place in the policy table."""
    assert {int(code) for code in Exit} == SUCCESS | RETRY_SOON | NEVER_RETRY
    assert not (SUCCESS & RETRY_SOON or SUCCESS & NEVER_RETRY or RETRY_SOON & NEVER_RETRY)


# -- Kubernetes ------------------------------------------------------------------------------


def k8s_resources() -> list[Path]:
    return sorted(p for p in (DEPLOY / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")


def cronjob() -> dict[str, Any]:
    (doc,) = load_yaml(DEPLOY / "k8s" / "cronjob.yaml")
    return doc


def k8s_verdict(job: dict[str, Any], code: int) -> str:
    """What the Job controller does with a pod that exited `code`: its podFailurePolicy
    rules in order, then the backoffLimit."""
    if code == 0:
        return "success"
    for rule in job["podFailurePolicy"]["rules"]:
        on = rule.get("onExitCodes")
        if on and (code in on["values"]) == (on["operator"] == "In"):
            return {"FailJob": "fail", "Ignore": "retry", "Count": "count"}[rule["action"]]
    return "count" if job["backoffLimit"] > 0 else "fail"


def test_kubernetes_manifests_match_the_official_schemas() -> None:
    """Every resource validates strictly (no unknown field) for 1.31 and the newest Kubernetes."""
    files = [str(p) for p in k8s_resources()]
    assert len(files) >= 2
    for version in ("1.31.0", None):
        result = tool(
            "kubernetes-validate", "--strict", *(["-k", version] if version else []), *files
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_kustomization_generates_what_the_cronjob_mounts(tmp_path: Path) -> None:
    """The kustomization lists the resources that exist, and generates the ConfigMap (job file,
    manifest) and Secret the CronJob names; the operator's own files are git-ignored; the
    generated objects validate too."""
    kust = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in k8s_resources())
    spec = cronjob()["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    generated = {g["name"]: g for g in kust["configMapGenerator"]}
    secrets = {g["name"]: g for g in kust["secretGenerator"]}
    config = next(v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v)
    assert config in generated
    assert [e["secretRef"]["name"] for e in container["envFrom"]] == list(secrets)
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "config")
    assert container["args"][:3] == ["sync", "--job", f"{mount}/job.toml"]
    job = tomllib.loads((DEPLOY / "k8s" / "job.toml").read_text())
    assert job["command"] == "sync" and job["manifest"] in generated[config]["files"]
    assert "job.toml" in generated[config]["files"]
    ignored = (DEPLOY / "k8s" / ".gitignore").read_text().split()
    operator_files = [f for f in generated[config]["files"] if not (DEPLOY / "k8s" / f).exists()]
    assert operator_files == ["groups.jsonl"] and "groups.jsonl" in ignored
    assert (
        secrets["live-groups-credentials"]["envs"] == ["credentials.env"]
        and "credentials.env" in ignored
    )

    # What kustomize would generate, validated like the rest.
    made = tmp_path / "generated.yaml"
    made.write_text(
        yaml.safe_dump_all(
            [
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": f"{config}-5h2k8f9c"},
                    "data": {
                        "job.toml": (DEPLOY / "k8s" / "job.toml").read_text(),
                        "groups.jsonl": '{"Name": "华北01"}\n',
                    },
                },
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "type": "Opaque",
                    "metadata": {"name": "live-groups-credentials-7g6b2m4d"},
                    "data": {"VOLC_ACCESSKEY": "QUs=", "VOLC_SECRETKEY": "U0s="},
                },
            ],
            allow_unicode=True,
        )
    )
    result = tool("kubernetes-validate", "--strict", str(made))
    assert result.returncode == 0, result.stdout + result.stderr


def test_cronjob_follows_the_policy() -> None:
    """Codes a retry cannot fix fail the Job at once; 3, 4, 5 are retried; one run at a time."""
    cj = cronjob()["spec"]
    job = cj["jobTemplate"]["spec"]
    assert cj["concurrencyPolicy"] == "Forbid"
    assert job["backoffLimit"] >= 1
    assert job["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy needs it
    for code in SUCCESS:
        assert k8s_verdict(job, code) == "success"
    for code in RETRY_SOON:
        assert k8s_verdict(job, code) == "count", code
    for code in NEVER_RETRY:
        assert k8s_verdict(job, code) == "fail", code
    assert {"type": "DisruptionTarget", "status": "True"} in [
        c
        for r in job["podFailurePolicy"]["rules"]
        if r["action"] == "Ignore"
        for c in r["onPodConditions"]
    ]


def test_cronjob_runs_non_root_and_can_write_its_ledger() -> None:
    """The image's numeric user, fsGroup for the ledger volume, no privilege, a grace period
    longer than the worker's, the ledger on a PVC, metrics on a named port."""
    pod = cronjob()["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    ctx = pod["securityContext"]
    uid, gid = image_user()
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == uid and ctx["runAsGroup"] == gid
    assert ctx["fsGroup"] == gid
    (container,) = pod["containers"]
    c = container["securityContext"]
    assert c["allowPrivilegeEscalation"] is False and c["capabilities"]["drop"] == ["ALL"]
    assert c["readOnlyRootFilesystem"] is True
    assert pod["terminationGracePeriodSeconds"] > GRACE_S
    state = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
    (pvc,) = load_yaml(DEPLOY / "k8s" / "pvc.yaml")
    assert state["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    state_mount = next(
        m["mountPath"] for m in container["volumeMounts"] if m["name"] == state["name"]
    )
    job = tomllib.loads((DEPLOY / "k8s" / "job.toml").read_text())
    assert Path(job["ledger"]).parent == Path(state_mount)
    assert container["image"].rsplit(":", 1)[1] != "latest"


def test_cronjob_pushes_metrics_instead_of_serving_a_port() -> None:
    """A Job's pod ends seconds after its run, before a scrape: no metrics port or scrape
    annotation, and the job file names a Pushgateway (--metrics-push) instead."""
    template = cronjob()["spec"]["jobTemplate"]["spec"]["template"]
    (container,) = template["spec"]["containers"]
    assert "ports" not in container
    assert not any(
        k.startswith("prometheus.io/") for k in template["metadata"].get("annotations", {})
    )
    for job_file in (DEPLOY / "k8s" / "job.toml", LARGE / "job.toml"):
        text = job_file.read_text()
        job = tomllib.loads(text)
        assert not {"metrics-port", "metrics-host"} & set(job), job_file
        assert job["metrics-push"].startswith("http://"), job_file


# -- systemd ---------------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "live-groups-sync.service"
TIMER = DEPLOY / "systemd" / "live-groups-sync.timer"


def systemd_verdict(unit: dict[str, list[str]], code: int) -> str:
    """What systemd does with a main process that exited `code` (Restart=on-failure)."""
    success = {0} | {int(c) for v in unit.get("Service.SuccessExitStatus", []) for c in v.split()}
    if code in success:
        return "success"
    prevent = {int(c) for v in unit.get("Service.RestartPreventExitStatus", []) for c in v.split()}
    if unit["Service.Restart"] == ["on-failure"] and code not in prevent:
        return "restart"
    return "failed"


def test_systemd_unit_follows_the_policy() -> None:
    """Only 0 succeeds; 3, 4, 5 restart (a bounded number of times); the rest fail for a human."""
    unit = unit_entries(UNIT)
    for code in SUCCESS:
        assert systemd_verdict(unit, code) == "success"
    for code in RETRY_SOON:
        assert systemd_verdict(unit, code) == "restart", code
    for code in NEVER_RETRY:
        assert systemd_verdict(unit, code) == "failed", code
    assert (
        unit["Unit.StartLimitBurst"] and unit["Unit.StartLimitIntervalSec"]
    )  # restarts are bounded
    assert int(unit["Service.TimeoutStopSec"][0]) > GRACE_S


def test_systemd_unit_has_a_dedicated_user_state_and_hardening() -> None:
    """A dedicated user, StateDirectory for the ledger, and the usual hardening options."""
    unit = unit_entries(UNIT)
    assert unit.get("Service.DynamicUser") == ["yes"] or unit["Service.User"] == ["live-groups"]
    assert unit["Service.StateDirectory"] == ["live-groups"]
    for key, value in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("PrivateTmp", "yes"),
        ("ProtectHome", "yes"),
        ("PrivateDevices", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictSUIDSGID", "yes"),
        ("ProtectKernelTunables", "yes"),
    ]:
        assert unit[f"Service.{key}"] == [value], key
    sysusers = (DEPLOY / "systemd" / "live-groups.sysusers").read_text()
    assert re.search(r"^u live-groups - .* /var/lib/live-groups ", sysusers, re.M)
    job = tomllib.loads((DEPLOY / "systemd" / "nightly-sync.toml").read_text())
    assert Path(job["ledger"]).parent == Path("/var/lib/live-groups")  # the StateDirectory
    assert Path(job["metrics-file"]).parent == Path(unit["Service.ReadWritePaths"][0])
    exec_start = shlex.split(unit["Service.ExecStart"][0])
    assert exec_start[1:] == ["sync", "--job", "/etc/live-groups/nightly-sync.toml"]


def test_systemd_analyze_verifies_the_unit_and_timer(tmp_path: Path) -> None:
    """`systemd-analyze verify` finds nothing to say (unknown keys are reported there), and
    `systemd-analyze security` rates the hardening OK. ExecStart points at this venv's worker
    instead of /opt/live-groups, which does not exist here."""
    assert shutil.which("systemd-analyze"), (
        "systemd-analyze is part of systemd (apt-get install systemd)"
    )
    unit = tmp_path / UNIT.name
    unit.write_text(
        UNIT.read_text().replace("/opt/live-groups/.venv/bin/worker", str(BIN / "worker"))
    )
    shutil.copy(TIMER, tmp_path / TIMER.name)
    result = tool(
        "systemd-analyze", "verify", "--man=no", f"./{unit.name}", f"./{TIMER.name}", cwd=tmp_path
    )
    assert result.returncode == 0 and result.stdout + result.stderr == "", (
        result.stdout + result.stderr
    )
    result = tool(
        "systemd-analyze",
        "security",
        "--offline=true",
        "--threshold=20",
        f"./{unit.name}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


# -- the image ---------------------------------------------------------------------------------

DOCKERFILE = DEPLOY / "Dockerfile"


def image_user() -> tuple[int, int]:
    (user,) = re.findall(r"^USER (\d+):(\d+)$", DOCKERFILE.read_text(), re.M)
    return int(user[0]), int(user[1])


def test_dockerfile_passes_hadolint() -> None:
    """hadolint finds nothing, not even style notes, and nothing is silenced."""
    text = DOCKERFILE.read_text()
    assert "hadolint ignore" not in text
    result = tool("hadolint", "--failure-threshold", "style", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_base_user_and_home() -> None:
    """The base image is pinned to an exact release; the user is numeric, not root, and has a
    home directory (so ~/.volc/credentials can be mounted); ledgers go to /state, its own."""
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM (\S+)", text, re.M)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base
    uid, gid = image_user()
    assert uid != 0 and gid != 0
    assert f"--uid {uid}" in text and "--create-home --home-dir /home/worker" in text
    assert f"install -d -o {uid} -g {gid}" in text and "/state" in text


def test_image_installs_only_from_the_generated_lock() -> None:
    """Dependencies come from deploy/requirements.lock with hashes; the lock says how it was
    generated and pins every dependency pyproject.toml names (regenerate it when they change)."""
    text = DOCKERFILE.read_text()
    assert "pip install --require-hashes --no-deps -r requirements.lock" in text
    assert "pip install --no-deps --no-build-isolation --no-index ." in text
    lock = (DEPLOY / "requirements.lock").read_text()
    assert (
        "#    pip-compile --allow-unsafe --generate-hashes" in lock
    )  # generated, with its command
    pinned = {
        m.group(1).lower(): m.group(2)
        for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==(\S+) \\$", lock, re.M)
    }
    blocks = re.split(r"^(?=[A-Za-z])", lock, flags=re.M)
    assert all("--hash=sha256:" in b for b in blocks if re.match(r"[A-Za-z]", b))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = [
        re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower()
        for d in project["project"]["dependencies"]
    ]
    wanted += ["setuptools"]  # the build backend, installed from the lock too
    missing = [name for name in wanted if name.replace("_", "-") not in pinned]
    assert not missing, (
        f"regenerate deploy/requirements.lock (its header has the command): {missing}"
    )
    assert not re.search(r"file://|^--index-url|^--extra-index-url|^--find-links", lock, re.M)


def test_dockerignore_admits_exactly_what_the_dockerfile_copies() -> None:
    """The build context is an allow-list: everything out, then each COPY source back in."""
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied: set[str] = set()
    for match in re.finditer(r"^COPY (.+) (\S+)$", DOCKERFILE.read_text(), re.M):
        copied.update(match.group(1).split())
    assert allowed == copied


# -- compose -----------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    (doc,) = load_yaml(DEPLOY / "compose.yaml")
    return doc


def test_compose_file_matches_the_compose_spec() -> None:
    """The compose specification's schema (vendored in check-jsonschema: no network) accepts it."""
    result = tool(
        "check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml")
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_does_not_loop_and_can_write_its_ledgers() -> None:
    """Workers are never restarted by compose (worker-retry applies the policy); they run as
    the image's user with ledgers on a named volume; they wait for a healthy Redis."""
    doc = compose()
    services = doc["services"]
    workers = {name: s for name, s in services.items() if name.startswith("worker")}
    assert workers
    uid, gid = image_user()
    for name, svc in workers.items():
        assert svc["restart"] == "no", name
        assert svc["entrypoint"] == ["worker-retry"], name
        assert svc["user"] == f"{uid}:{gid}", name
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert (
            re.fullmatch(r"\d+s", svc["stop_grace_period"])
            and int(svc["stop_grace_period"][:-1]) > GRACE_S
        )
        volume, target = next(
            v.split(":")[:2] for v in svc["volumes"] if v.split(":")[1] == "/state"
        )
        assert volume in doc["volumes"], "the ledger is on a named volume, not a host directory"
        args = svc["command"]
        assert args[:3] == ["run", "--job", "/jobs/migration.toml"]
        assert args[args.index("--ledger") + 1].startswith(target + "/")
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+-alpine", services["redis"]["image"])
    retry = (DEPLOY / "worker-retry").read_text()
    retried = set(
        map(int, re.findall(r"^\s+([\d |]+)\) ;;$", retry, re.M)[0].replace("|", " ").split())
    )
    assert retried == RETRY_SOON


def test_worker_retry_is_valid_posix_sh() -> None:
    """The wrapper parses under the image's /bin/sh (dash on Debian) and is executable."""
    script = DEPLOY / "worker-retry"
    assert script.stat().st_mode & 0o111
    assert subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True).returncode == 0
