"""The deploy recipes match the release: one version and the image tags that follow it, the
Kubernetes manifest's size limit measured and a variant past it, and the systemd recipe's own
install commands run into a scratch root, checked against what the unit names."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import worker
from tests.test_deploy import DEPLOY, LARGE, ROOT, cronjob, tool, unit_entries

CONFIGMAP_MAX = 1 << 20  # the API server's limit on a ConfigMap's data (keys and values)
ANNOTATIONS_MAX = 256 << 10  # on all of an object's annotations (client-side apply copies it)
EXAMPLE = ROOT / "jobs" / "examples" / "groups.jsonl"

# -- one version -------------------------------------------------------------------------------


def test_pyproject_takes_its_version_from_the_package() -> None:
    """pyproject.toml states no version of its own: setuptools reads worker.__version__."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "worker.__version__"}


def image_tags() -> list[tuple[str, str]]:
    """Every `live-groups-worker:TAG` in deploy/, README.md and docs/*.md, as (file, tag)."""
    files = [p for p in DEPLOY.rglob("*") if p.is_file() and p.name != "requirements.lock"]
    files += [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [
        (str(path.relative_to(ROOT)), tag)
        for path in files
        for tag in re.findall(r"live-groups-worker:([^\s\"'`]+)", path.read_text())
    ]


def test_every_image_tag_names_the_release() -> None:
    """The Dockerfile's build line, compose, the CronJob and the docs all name __version__."""
    tags = image_tags()
    named = {path for path, _ in tags}
    assert {"deploy/Dockerfile", "deploy/compose.yaml", "deploy/k8s/cronjob.yaml"} <= named
    assert "docs/migrate.md" in named
    wrong = [(path, tag) for path, tag in tags if tag != worker.__version__]
    assert not wrong, f"image tags other than {worker.__version__}: {wrong}"


# -- Kubernetes: how large a manifest, and past that ---------------------------------------------


def measured_limits() -> tuple[int, int]:
    """How many groups shaped like the example manifest fit the generated ConfigMap: applied
    server-side (its data ≤ 1 MiB) and client-side (the whole object again as JSON in the
    last-applied annotation, ≤ 256 KiB)."""
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines(keepends=True)
    per_line = sum(len(line.encode()) for line in lines) / len(lines)
    job = (DEPLOY / "k8s" / "job.toml").read_text()
    fixed = len(b"job.toml") + len(job.encode()) + len(b"groups.jsonl")
    server = int((CONFIGMAP_MAX - fixed) // per_line)
    annotation = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "live-groups-job-5h2k8f9c", "namespace": "default"},
        "data": {"job.toml": job, "groups.jsonl": ""},
    }
    base = len(json.dumps(annotation, ensure_ascii=False).encode())
    per_json = sum(len(json.dumps(line, ensure_ascii=False).encode()) - 2 for line in lines)
    client = int((ANNOTATIONS_MAX - base) // (per_json / len(lines)))
    return server, client


def about(n: int) -> str:
    return "about " + f"{n // 100 * 100:,}".replace(",", " ")


def test_configmap_limit_is_stated_with_the_measured_count() -> None:
    """The recipe says how many groups the ConfigMap holds (measured on the example manifest),
    that a client-side apply holds far fewer, and applies server-side."""
    server, client = measured_limits()
    assert 9000 < server < 11000 and 1500 < client < 3000  # the figures in the text below
    docs = (ROOT / "docs" / "nightly-sync.md").read_text()
    kust = (DEPLOY / "k8s" / "kustomization.yaml").read_text()
    for text in (docs, kust):
        assert about(server) in text and about(client) in text
        assert "kubectl apply --server-side -k deploy/k8s" in text
    assert about(server) in (DEPLOY / "k8s" / "cronjob.yaml").read_text()


def json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902 `add`, the only operation the component uses (kustomize applies it likewise)."""
    for op in ops:
        assert op["op"] == "add", op
        *parents, last = [
            p.replace("~1", "/").replace("~0", "~") for p in op["path"][1:].split("/")
        ]
        target = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if isinstance(target, list):
            target.insert(len(target) if last == "-" else int(last), op["value"])
        else:
            assert last not in target, op["path"]
            target[last] = op["value"]
    return doc


def test_large_manifest_component_fetches_into_what_the_worker_reads(tmp_path: Path) -> None:
    """The component patches the CronJob into one that validates; its initContainer writes the
    file its job.toml names, as the pod's user, hardened like the worker; the URL comes from
    a generated Secret whose file is git-ignored; the base kustomization offers it."""
    comp = yaml.safe_load((LARGE / "kustomization.yaml").read_text())
    assert comp["kind"] == "Component"
    (patch,) = comp["patches"]
    patched = json_patch(cronjob(), yaml.safe_load((LARGE / patch["path"]).read_text()))
    made = tmp_path / "cronjob.yaml"
    made.write_text(yaml.safe_dump(patched))
    for version in ("1.31.0", None):
        result = tool(
            "kubernetes-validate", "--strict", *(["-k", version] if version else []), str(made)
        )
        assert result.returncode == 0, result.stdout + result.stderr

    pod = patched["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (fetch,) = pod["initContainers"]
    (container,) = pod["containers"]
    job = tomllib.loads((LARGE / "job.toml").read_text())
    out = Path(fetch["command"][fetch["command"].index("--output") + 1])
    assert Path(job["manifest"]) == out
    fetch_mount = {m["name"]: m["mountPath"] for m in fetch["volumeMounts"]}
    worker_mount = {m["name"]: m for m in container["volumeMounts"]}
    (name,) = [n for n, path in fetch_mount.items() if out.parent == Path(path)]
    assert worker_mount[name]["mountPath"] == fetch_mount[name]
    assert worker_mount[name]["readOnly"] is True
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == name)
    assert fetch["securityContext"] == container["securityContext"]
    assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+", fetch["image"]), fetch["image"]
    assert "--fail" in fetch["command"] and "--max-filesize" in fetch["command"]
    secret = comp["secretGenerator"][0]
    assert fetch["envFrom"] == [{"secretRef": {"name": secret["name"]}}]
    assert "$(MANIFEST_URL)" in fetch["command"]
    assert secret["envs"][0] in (LARGE / ".gitignore").read_text().split()
    (generator,) = comp["configMapGenerator"]
    assert generator["behavior"] == "merge" and generator["files"] == ["job.toml"]
    assert Path(job["ledger"]) == Path(
        tomllib.loads((DEPLOY / "k8s" / "job.toml").read_text())["ledger"]
    )
    base = (DEPLOY / "k8s" / "kustomization.yaml").read_text()
    assert re.search(r"^# components:\n#   - large-manifest$", base, re.M)


# -- systemd: the install commands, rehearsed ----------------------------------------------------

INSTALL = DEPLOY / "systemd" / "install"


# The three tests that read the install share one (it takes seconds) and run in the serial
# phase of scripts/test: in one process, so it is made once. Spread over pytest-xdist's
# processes each would make its own, and two at once collide in this checkout's build/
# folder (pip builds the worker there). xdist's loadgroup would keep them on one process,
# but ignores its mark on pytest 9.2.
ON_ONE_INSTALL = pytest.mark.serial


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    """deploy/systemd/install as documented, into a scratch root other users can traverse."""
    assert shutil.which("setfacl"), "the install grants the textfile directory: apt-get install acl"
    assert os.path.exists("/usr/bin/python3"), "the recipe builds its venv from /usr/bin/python3"
    root = Path(tempfile.mkdtemp(prefix="install-", dir="/tmp"))
    try:  # a failed install leaves no root behind in /tmp either
        root.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
        env["INSTALL_ROOT"] = str(root)
        result = subprocess.run(
            ["sh", str(INSTALL)], env=env, capture_output=True, text=True, timeout=600, cwd="/"
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"installed: worker {worker.__version__}" in result.stdout
        yield root
    finally:
        shutil.rmtree(root)


def unit_paths(unit: dict[str, list[str]]) -> set[str]:
    """Every absolute path the unit names that must exist before it starts."""
    exec_start = shlex.split(unit["Service.ExecStart"][0])
    paths = {exec_start[0], *(a for a in exec_start[1:] if a.startswith("/"))}
    paths.update(v.lstrip("-") for v in unit["Service.EnvironmentFile"])
    paths.update(p for v in unit["Service.ReadWritePaths"] for p in v.split())
    paths.update(d.removeprefix("file://") for v in unit["Unit.Documentation"] for d in v.split())
    return paths


@pytest.mark.slow
@ON_ONE_INSTALL
def test_install_creates_every_path_the_unit_names(installed: Path) -> None:
    """ExecStart's binary, the job file, the credentials, the textfile directory and the
    documentation exist after the install; the units and the sysusers file are in place."""
    unit = unit_entries(DEPLOY / "systemd" / "live-groups-sync.service")
    missing = [p for p in sorted(unit_paths(unit)) if not (installed / p.lstrip("/")).exists()]
    assert not missing, missing
    assert unit["Service.WorkingDirectory"] == [f"%S/{unit['Service.StateDirectory'][0]}"]
    for name in ("live-groups-sync.service", "live-groups-sync.timer"):
        assert (installed / "etc/systemd/system" / name).read_text() == (
            DEPLOY / "systemd" / name
        ).read_text()
    job = tomllib.loads((installed / "etc/live-groups/nightly-sync.toml").read_text())
    assert Path(job["metrics-file"]).parent == Path(unit["Service.ReadWritePaths"][0])
    credentials = (installed / "etc/live-groups/credentials.env").stat()
    assert credentials.st_uid == 0 and stat.S_IMODE(credentials.st_mode) == 0o600


def passwd_entry(root: Path, name: str) -> list[str]:
    (entry,) = [
        line.split(":")
        for line in (root / "etc/passwd").read_text().splitlines()
        if line.startswith(f"{name}:")
    ]
    return entry


@pytest.mark.slow
@ON_ONE_INSTALL
def test_install_makes_the_units_user_and_grants_only_what_it_writes(installed: Path) -> None:
    """User=/Group= exist (from the sysusers file) with the state directory as home and no
    shell; the venv is root's and not writable by others; the user may write the textfile
    directory (an ACL) and nothing the install made."""
    unit = unit_entries(DEPLOY / "systemd" / "live-groups-sync.service")
    (user,) = unit["Service.User"]
    (group,) = unit["Service.Group"]
    entry = passwd_entry(installed, user)
    assert (
        entry[5] == f"/var/lib/{unit['Service.StateDirectory'][0]}"
        and entry[6] == "/usr/sbin/nologin"
    )
    groups = {
        line.split(":")[0]: line.split(":")[2]
        for line in (installed / "etc/group").read_text().splitlines()
    }
    assert groups[group] == entry[3]
    for path in (installed / "opt/live-groups").rglob("*"):
        st = path.lstat()
        assert st.st_uid == 0 and not (st.st_mode & 0o022 and not path.is_symlink()), path
    acl = subprocess.run(
        ["getfacl", "-p", "-n", str(installed / "var/lib/prometheus/node-exporter")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"user:{entry[2]}:rwx" in acl


@pytest.mark.slow
@ON_ONE_INSTALL
def test_service_user_runs_the_installed_worker(installed: Path) -> None:
    """The venv's interpreter is a system one (not under /root or /home: ProtectHome hides
    those), and the service's uid runs ExecStart's binary and imports every dependency
    (the shared limiter's redis client included) from it."""
    unit = unit_entries(DEPLOY / "systemd" / "live-groups-sync.service")
    venv_bin = installed / shlex.split(unit["Service.ExecStart"][0])[0].lstrip("/")
    real = Path(os.path.realpath(venv_bin.parent / "python"))
    assert not real.is_relative_to("/root") and not real.is_relative_to("/home"), real
    entry = passwd_entry(installed, unit["Service.User"][0])
    uid, gid = int(entry[2]), int(entry[3])
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent"}

    def as_user(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            user=uid,
            group=gid,
            extra_groups=[],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        )

    version = as_user(str(venv_bin), "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"worker {worker.__version__}", (
        version
    )
    imports = as_user(
        str(venv_bin.parent / "python"), "-c", "import worker.pacing.shared, worker.cli"
    )
    assert imports.returncode == 0, imports.stderr
