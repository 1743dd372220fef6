"""A user's mistake is a message naming it and exit 2, never a traceback: one table of bad
paths, URLs and numbers, each given through the real CLI, on a dry run and on a real run."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import cli_env, names, run_worker, write_manifest

pytestmark = pytest.mark.slow  # real processes

LONG = "n" * 300  # longer than any name ext4, xfs or tmpfs allows (255 bytes)
DEAD = "http://127.0.0.1:1"  # nothing listens: a run that got past the checks would exit 3


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    says: tuple[str, ...]  # each must be in stderr: where the value came from, and the value
    env: dict[str, str] = field(default_factory=dict)
    job: str | None = None  # a job file's text: given with --job
    home: str | None = None  # a credentials path under HOME made a directory
    absent: tuple[str, ...] = ()  # must appear nowhere in the output (a secret)


CASES = {
    # credential files: a secret mounted as a folder (Kubernetes without subPath)
    "volc credentials is a directory": Case(
        (), (".volc/credentials", "directory"), home=".volc/credentials"
    ),
    "volc config is a directory": Case((), (".volc/config", "directory"), home=".volc/config"),
    "ve config is a directory": Case(
        (), (".volcengine/config.json", "directory"), home=".volcengine/config.json"
    ),
    # paths too long for the file system, from each place a path can come from
    "manifest flag": Case(("{W}/" + LONG,), ("MANIFEST", "nnnn", "longer than the file system")),
    "manifest variable": Case(
        (), ("WORKER_MANIFEST", "nnnn", "longer"), env={"WORKER_MANIFEST": "{W}/" + LONG}
    ),
    "manifest job key": Case(
        (), ("job.toml:2: manifest", "nnnn", "longer"), job=f'manifest = "{{W}}/{LONG}"'
    ),
    "job file": Case(("--job", "{W}/" + LONG), ("nnnn", "too long")),
    "ledger": Case(("{M}", "--ledger", "{W}/d/" + LONG + "/l"), ("--ledger", "nnnn", "longer")),
    "default ledger": Case(("{M250}",), ("the default ledger", "longer")),
    "metrics file": Case(("{M}", "--metrics-file", "{W}/x/" + LONG), ("--metrics-file", "longer")),
    "manifest under a file": Case(("{M}/x",), ("MANIFEST", "m.jsonl/x", "is a file")),
    # the limiter's URL, from the flag, the variable and the job file
    "limiter port": Case(
        ("{M}", "--limiter", "redis://127.0.0.1:99999/3"), ("--limiter", "99999", "1..65535")
    ),
    "limiter bad value": Case(
        ("{M}", "--limiter", "redis://127.0.0.1/3?socket_timeout=abc"),
        ("--limiter", "socket_timeout", "'abc'"),
    ),
    "limiter unknown parameter": Case(
        ("{M}", "--limiter", "redis://127.0.0.1/3?sockettimeout=1"),
        ("unknown parameter 'sockettimeout'",),
    ),
    "limiter db twice": Case(
        ("{M}",),
        ("WORKER_LIMITER", "?db=3", "/12"),
        env={"WORKER_LIMITER": "redis://127.0.0.1/12?db=3"},
    ),
    "limiter fragment": Case(
        ("{M}", "--limiter", "redis://127.0.0.1/3#hunter2"),
        ("--limiter", "#***", "fragment"),
        absent=("hunter2",),
    ),
    "limiter password in a job file": Case(
        ("{M}",),
        ("job.toml:2: limiter", "password", "WORKER_LIMITER"),
        job='limiter = "redis://127.0.0.1/3?password=hunter2"',
        absent=("hunter2",),
    ),
    "limiter job key": Case(
        ("{M}",), ("job.toml:2: limiter", "port"), job='limiter = "redis://127.0.0.1:0/3"'
    ),
    "endpoint fragment": Case(
        ("{M}", "--endpoint", "http://127.0.0.1:1#sig=hunter2"),
        ("--endpoint", "#sig=***"),
        absent=("hunter2",),
    ),
    "endpoint variable": Case(
        ("{M}",),
        ("WORKER_ENDPOINT", "127.0.0.1:1/x"),
        env={"WORKER_ENDPOINT": "http://127.0.0.1:1/x"},
    ),
    "rate too small": Case(("{M}", "--rate", "1e-300"), ("--rate", "1e-300", "[0.2, 10000]")),
}


def _subst(text: str, work: Path) -> str:
    return text.replace("{W}", str(work)).replace("{M}", str(work / "m.jsonl"))


# A dry run of `run` sends nothing and reads no credentials: the credential-file cases are
# run for real only.
RUNS = [
    pytest.param(name, dry, id=f"{name}-{'dry-run' if dry else 'run'}")
    for name, case in CASES.items()
    for dry in (True, False)
    if not (dry and case.home is not None)
]


@pytest.fixture
def work() -> Iterator[Path]:
    """A folder with a short path for the inputs: a message shows a long path's first 80
    characters, and the value (LONG's n's) must be among them however long pytest's own
    folder is (pytest-xdist adds a level to it)."""
    path = Path(tempfile.mkdtemp(prefix="mistakes-", dir="/tmp"))
    yield path
    shutil.rmtree(path)


@pytest.mark.parametrize(("name", "dry"), RUNS)
def test_each_mistake_is_named_and_exits_2_with_nothing_written(
    tmp_path: Path, work: Path, name: str, dry: bool
) -> None:
    """Each bad input: exit 2, stderr names where it came from and its value (redacted), no
    traceback, no ledger (nor lock, index, spool) created, on a dry run too."""
    case = CASES[name]
    write_manifest(work / "m.jsonl", names(2))
    write_manifest(work / ("m" * 250), names(1))  # fits; with .ledger.jsonl after it, not
    args = [_subst(a, work) for a in case.args]
    args = [str(work / ("m" * 250)) if a == "{M250}" else a for a in args]
    env = cli_env(tmp_path) | {k: _subst(v, work) for k, v in case.env.items()}
    if case.home is not None:  # no keys in the environment: the files are read
        env = {k: v for k, v in env.items() if not k.startswith(("VOLC_", "VOLCENGINE_"))}
        (tmp_path / case.home).mkdir(parents=True)
        args = args or [str(work / "m.jsonl")]
    if case.job is not None:
        job = work / "job.toml"
        job.write_text(f'command = "run"\n{_subst(case.job, work)}\n', encoding="utf-8")
        args += ["--job", str(job)]
    if "--endpoint" not in args and "WORKER_ENDPOINT" not in env:
        args += ["--endpoint", DEAD]
    before = set(os.listdir(work))
    out = run_worker("run", *args, *(["--dry-run"] * dry), "--timeout", "1", env=env)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr
    for text in case.says:
        assert text in out.stderr, (text, out.stderr[-2000:])
    for text in case.absent:
        assert text not in out.stderr and text not in out.stdout
    assert set(os.listdir(work)) == before, "something was written"
