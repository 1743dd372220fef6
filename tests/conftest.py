"""Shared fixtures: the sandbox as a real process on loopback, and the CLI as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from worker.sandbox import process
from worker.sandbox.process import SandboxProc, max_in_window

__all__ = ["SandboxProc", "max_in_window"]

AK, SK = "AKTESTE2E", "SKtestE2Esecret"


# -- the two phases of scripts/test -------------------------------------------------------
# scripts/test runs the suite twice: `--phase parallel` (every test not marked `serial`) on
# several pytest-xdist workers, then `--phase serial` (the `serial` ones) one at a time in
# one process. A `serial` test asserts behaviour that holds only when its processes get the
# CPU on time (a strict window at the sandbox, a rate reached, a burst landing inside one
# second), which a neighbour on a 2-core machine can starve; or it shares a costly set-up
# that must be made once. An option, not `-m`, so that a `-m` the user passes to
# scripts/test still composes with it (pytest keeps only the last `-m`).


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--phase",
        choices=("parallel", "serial"),
        default=None,
        help="run only the tests not marked serial (parallel) or only those marked (serial); "
        "default: all",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    phase = config.getoption("phase")
    if phase is None:
        return
    wanted = phase == "serial"
    keep = [item for item in items if (item.get_closest_marker("serial") is not None) == wanted]
    drop = [item for item in items if (item.get_closest_marker("serial") is not None) != wanted]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def start_sandbox(tmp: Path, *args: str, keys: dict[str, str] | None = None) -> SandboxProc:
    return process.start_sandbox(tmp, *args, keys=keys or {AK: SK})


@pytest.fixture
def sandbox_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[SandboxProc] = []

    def make(*args: str, keys: dict[str, str] | None = None) -> SandboxProc:
        sb = start_sandbox(tmp_path, *args, keys=keys)
        started.append(sb)
        return sb

    yield make
    for sb in started:
        sb.stop()


@pytest.fixture
def sandbox(sandbox_factory: Any) -> SandboxProc:
    sb: SandboxProc = sandbox_factory()
    return sb


def cli_env(home: Path, ak: str = AK, sk: str = SK, token: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOLC_", "WORKER_"))}
    env.update(HOME=str(home), VOLC_ACCESSKEY=ak, VOLC_SECRETKEY=sk, PYTHONUNBUFFERED="1")
    # The test hooks (tests/hooks/sitecustomize.py): inert unless a test sets a TESTHOOK_ variable.
    hooks = str(Path(__file__).parent / "hooks")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (hooks, env.get("PYTHONPATH")) if p)
    if token is not None:
        env["VOLC_SESSION_TOKEN"] = token
    return env


def worker_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "worker", *args]


def run_worker(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        worker_cmd(*args),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def write_manifest(path: Path, groups: list[dict[str, Any]]) -> Path:
    path.write_text(
        "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in groups), encoding="utf-8"
    )
    return path


def names(n: int, prefix: str = "组") -> list[dict[str, Any]]:
    """n valid groups with Chinese names and a tag each."""
    return [
        {
            "Name": f"{prefix}{i:05d}",
            "ProjectName": "default",
            "Tags": [{"Key": "批次", "Value": f"b{i % 7}", "Category": "Custom"}],
        }
        for i in range(n)
    ]


def ledger_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -- a Pushgateway stand-in ------------------------------------------------------------------


@dataclass
class Gateway:
    """What a recording HTTP server on loopback received: (method, path, body)."""

    url: str
    received: list[tuple[str, str, str]] = field(default_factory=list)
    answer: int = 200
    got_one: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = server.server_address[1]
    gw = Gateway(url=f"http://127.0.0.1:{port}")

    class Recorder(BaseHTTPRequestHandler):
        def _record(self) -> None:
            size = min(int(self.headers.get("Content-Length") or 0), 1 << 20)
            gw.received.append((self.command, self.path, self.rfile.read(size).decode()))
            gw.got_one.set()
            self.send_response(gw.answer)
            if gw.answer in (301, 302, 307, 308):
                self.send_header("Location", f"{gw.url}/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_PUT = do_POST = do_GET = _record

        def log_message(self, *args: Any) -> None:
            pass

    server.RequestHandlerClass = Recorder
    # shutdown() waits for serve_forever's next poll: 0.5 s by default, at every teardown
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield gw
    server.shutdown()
    server.server_close()
    thread.join()
