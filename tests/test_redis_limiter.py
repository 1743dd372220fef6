"""One rate budget for many worker processes, shared through a real Redis.

Needs Redis: REDIS_URL (default redis://127.0.0.1:6379/0) for the shared-budget tests, and the
`redis-server` binary for the outage tests (they start and kill their own server). Without
them these tests are skipped with a message saying how to get Redis, and with CI set they
fail instead: CI must run them.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    AK,
    SK,
    SandboxProc,
    cli_env,
    ledger_records,
    max_in_window,
    names,
    run_worker,
    worker_cmd,
    write_manifest,
)
from worker.pacing.redis_scripts import budget_key
from worker.pacing.shared import RedisPacer
from worker.settings import Pacing

pytestmark = [pytest.mark.redis, pytest.mark.slow]
HOW = (
    "start one (`redis-server --port 6379 --save '' &`, after `apt-get install "
    "redis-server`) or point REDIS_URL at one; `bash scripts/test` starts one by itself"
)


def own_key(prefix: str) -> str:
    """An access key no other test uses: the budget on the shared Redis is per access key,
    and other tests, other runs of this suite and xdist workers share that Redis."""
    return f"{prefix}{uuid.uuid4().hex}"


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must run the Redis tests): {HOW}")
    pytest.skip(f"{what}: {HOW}")


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        _missing(f"no Redis at {url} ({exc})")
    return url


class OwnRedis:
    """A redis-server of our own on a fixed free port, to stop and start at will."""

    def __init__(self, tmp: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            _missing("the redis-server binary is not installed")
        assert binary is not None
        self.binary = binary
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.tmp),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis.from_url(self.url, socket_timeout=0.5).ping()
                return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("own redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.kill()


def start_workers(
    tmp: Path,
    sb: SandboxProc,
    count: int,
    per: int,
    *extra: str,
    env_extra: list[dict[str, str]] | None = None,
    ak: str = AK,
) -> list[subprocess.Popen[str]]:
    procs = []
    for i in range(count):
        manifest = write_manifest(tmp / f"w{i}.jsonl", names(per, prefix=f"进程{i}组"))
        env = cli_env(tmp, ak=ak, sk=SK)
        env.update((env_extra or [{}] * count)[i])
        procs.append(
            subprocess.Popen(
                worker_cmd("run", str(manifest), "--endpoint", sb.url, "--rate", "20", *extra),
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def finish(procs: list[subprocess.Popen[str]], timeout: float = 120) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        out.append((p.returncode, err))
    return out


def aggregate_rate(sb: SandboxProc) -> float:
    ok: list[float] = sorted(a["t"] for a in sb.creates() if a["code"] == "")
    return (len(ok) - 1) / (ok[-1] - ok[0])


@pytest.mark.serial  # a strict 20/s window and a rate to reach
def test_three_workers_share_one_budget(
    redis_url: str, sandbox_factory: Any, tmp_path: Path
) -> None:
    """3 processes x 100 groups, one AK, sandbox strict at 20/s, shared limiter: no throttle,
    never more than 20 arrivals in a sliding second, >= 85% of 20/s together, all once."""
    ak = own_key("AKSHARE")
    sb: SandboxProc = sandbox_factory("--rate", "20", "--latency-ms", "20-200", keys={ak: SK})
    results = finish(start_workers(tmp_path, sb, 3, 100, "--limiter", redis_url, ak=ak))
    assert [code for code, _ in results] == [0, 0, 0], [err[-2000:] for _, err in results]
    arrivals = sb.creates()
    assert [a for a in arrivals if a["code"] == "FlowLimitExceeded"] == []
    assert max_in_window([a["t"] for a in arrivals]) <= 20
    assert aggregate_rate(sb) >= 0.85 * 20
    state = sb.state()
    assert len(state["groups"]) == 300 and all(g["created"] == 1 for g in state["groups"])


@pytest.mark.serial  # a strict 20/s window
def test_one_access_key_is_one_budget_however_the_endpoint_is_spelled(
    redis_url: str, sandbox_factory: Any, tmp_path: Path
) -> None:
    """3 processes on one AK, endpoints spelled 127.0.0.1:P, 127.0.0.1:P/ and localhost:P,
    sandbox strict at 20/s: they share one budget (no throttle), not one budget per spelling."""
    ak = own_key("AKSPELL")
    sb: SandboxProc = sandbox_factory("--rate", "20", "--latency-ms", "20-200", keys={ak: SK})
    port = sb.url.rsplit(":", 1)[1].rstrip("/")
    spellings = [
        f"http://127.0.0.1:{port}",
        f"http://127.0.0.1:{port}/",
        f"http://localhost:{port}",
    ]
    procs = []
    for i, endpoint in enumerate(spellings):
        manifest = write_manifest(tmp_path / f"s{i}.jsonl", names(60, prefix=f"拼写{i}组"))
        command = ["run", str(manifest), "--endpoint", endpoint, "--rate", "20"]
        procs.append(
            subprocess.Popen(
                worker_cmd(*command, "--limiter", redis_url),
                env=cli_env(tmp_path, ak=ak, sk=SK),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = finish(procs)
    assert [code for code, _ in results] == [0, 0, 0], [err[-2000:] for _, err in results]
    arrivals = sb.creates()
    assert [a for a in arrivals if a["code"] == "FlowLimitExceeded"] == []
    assert max_in_window([a["t"] for a in arrivals]) <= 20
    assert len(sb.state()["groups"]) == 180


def test_budget_key_names_the_access_key_and_region_only() -> None:
    """The shared budget's key follows the access key and the region, hashed; nothing else."""
    key = budget_key("AKLTexample", "cn-north-1")
    assert key == budget_key("AKLTexample", "cn-north-1")
    assert key.startswith("worker:pace:") and "AKLTexample" not in key
    assert key != budget_key("AKLTother", "cn-north-1")
    assert key != budget_key("AKLTexample", "cn-beijing")


def test_per_process_budgets_get_throttled(sandbox_factory: Any, tmp_path: Path) -> None:
    """The same setup with in-process limiters is throttled: the test above can tell them apart."""
    sb: SandboxProc = sandbox_factory("--rate", "20", "--latency-ms", "20-200")
    results = finish(start_workers(tmp_path, sb, 3, 40))
    assert all(code in (0, 3) for code, _ in results)
    throttled = sum(1 for a in sb.creates() if a["code"] == "FlowLimitExceeded")
    assert throttled > 0


@pytest.mark.serial  # a strict 20/s window, and seconds in which nothing may arrive
def test_redis_outage_pauses_then_resumes_without_burst(
    own_redis: OwnRedis, sandbox_factory: Any, tmp_path: Path
) -> None:
    """Redis killed for ~3 s mid-run: sending stops, resumes when it is back, no burst over the
    limit, every group done once."""
    sb: SandboxProc = sandbox_factory("--rate", "20", "--latency-ms", "20-100")
    procs = start_workers(
        tmp_path, sb, 2, 60, "--limiter", own_redis.url, "--limiter-timeout", "30"
    )
    deadline = time.monotonic() + 30
    while len(sb.state()["groups"]) < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    own_redis.kill()
    killed_at = time.time()
    time.sleep(3)
    own_redis.start()
    results = finish(procs)
    assert [code for code, _ in results] == [0, 0], [err[-2000:] for _, err in results]
    assert all("limiter.unreachable" in err and "limiter.back" in err for _, err in results)
    arrivals = sb.creates()
    assert [a for a in arrivals if a["code"] == "FlowLimitExceeded"] == []
    assert max_in_window([a["t"] for a in arrivals]) <= 20
    # nothing was sent while Redis was away (beyond what was already admitted when it died)
    during = [a for a in arrivals if killed_at + 1.0 < a["t"] < killed_at + 3.0]
    assert during == []
    state = sb.state()
    assert len(state["groups"]) == 120 and all(g["created"] == 1 for g in state["groups"])


def test_redis_gone_for_good_exits_3(
    own_redis: OwnRedis, sandbox_factory: Any, tmp_path: Path
) -> None:
    """Redis gone longer than --limiter-timeout: exit 3, consistent ledger, and a later run
    with Redis back completes the rest."""
    sb: SandboxProc = sandbox_factory("--rate", "20")
    [proc] = start_workers(
        tmp_path, sb, 1, 80, "--limiter", own_redis.url, "--limiter-timeout", "2"
    )
    deadline = time.monotonic() + 30
    while len(sb.state()["groups"]) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    own_redis.kill()
    [(code, err)] = finish([proc])
    assert code == 3, err[-2000:]
    assert "unreachable for more than 2s" in err and "Traceback" not in err
    records = ledger_records(tmp_path / "w0.ledger.jsonl")
    assert records[-1]["type"] == "end" and records[-1]["stopped_by"] == "limiter"
    done = {r["name"] for r in records if r["type"] == "result" and r["outcome"] == "created"}
    assert done == {g["Name"] for g in sb.state()["groups"]}  # every answer was recorded
    own_redis.start()
    again = run_worker(
        "run",
        str(tmp_path / "w0.jsonl"),
        "--endpoint",
        sb.url,
        "--rate",
        "20",
        "--limiter",
        own_redis.url,
        env=cli_env(tmp_path),
    )
    assert again.returncode == 0, again.stderr[-2000:]
    state = sb.state()
    assert len(state["groups"]) == 80 and all(g["created"] == 1 for g in state["groups"])


@pytest.mark.serial  # a strict 20/s window and a rate to reach
def test_skewed_host_clocks_share_the_budget(
    redis_url: str, sandbox_factory: Any, tmp_path: Path
) -> None:
    """Two processes whose clocks differ by 14 s still share the budget evenly: the slots come
    from the Redis server's clock, never from the hosts'."""
    ak = own_key("AKSKEW")
    sb: SandboxProc = sandbox_factory("--rate", "20", "--latency-ms", "10-100", keys={ak: SK})
    procs = start_workers(
        tmp_path,
        sb,
        2,
        60,
        "--limiter",
        redis_url,
        env_extra=[{"TESTHOOK_CLOCK_OFFSET_S": "-7"}, {"TESTHOOK_CLOCK_OFFSET_S": "7"}],
        ak=ak,
    )
    results = finish(procs)
    assert [code for code, _ in results] == [0, 0], [err[-2000:] for _, err in results]
    arrivals = sb.creates()
    assert Counter(a["code"] for a in arrivals) == {"": 120}
    assert max_in_window([a["t"] for a in arrivals]) <= 20
    assert aggregate_rate(sb) >= 0.85 * 20
    # the hook really shifted the clocks: the two ledgers' stamps are ~14 s apart
    started = [
        datetime.fromisoformat(ledger_records(tmp_path / f"w{i}.ledger.jsonl")[0]["started"])
        for i in range(2)
    ]
    assert abs((started[1] - started[0]).total_seconds() - 14) < 5


@pytest.mark.serial  # a rate to reach on the real clock
def test_pacers_in_one_loop_book_evenly_spaced_slots(redis_url: str) -> None:
    """Several RedisPacers on one key (as separate processes would be) admit 1/target apart."""

    async def main() -> list[float]:
        times: list[float] = []
        ak = own_key("AK-test-")
        pacers = [
            RedisPacer(
                redis_url, pacing=Pacing(rate=40), access_key=ak, region="cn-north-1", timeout_s=5
            )
            for _ in range(3)
        ]
        async with pacers[0], pacers[1], pacers[2]:

            async def use(p: RedisPacer) -> None:
                for _ in range(20):
                    await p.acquire()
                    times.append(time.monotonic())

            async with asyncio.TaskGroup() as tg:
                for p in pacers:
                    for _ in range(4):
                        tg.create_task(use(p))
        return sorted(times)

    times = asyncio.run(main())
    assert len(times) == 240
    assert max_in_window(times) <= 40
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert rate >= 0.9 * 40


class LateClock:
    """A local clock per task that moves only when its task sleeps: each sleep really waits (so
    that Redis's clock moves alike) and then reads exactly `late` seconds past what was asked.
    Per task (a context variable), so that concurrent sleepers do not add up each other's time."""

    def __init__(self) -> None:
        self.late = 0.0
        self._t: contextvars.ContextVar[float] = contextvars.ContextVar("t", default=0.0)

    def __call__(self) -> float:
        return self._t.get()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self._t.set(self._t.get() + seconds + self.late)


async def _tat(client: Any, key: str) -> int:
    return int(await client.get(key))


async def _tat_reaches(client: Any, key: str, expected: int) -> int:
    """The TAT key once it equals `expected` (or whatever it holds after 5 s)."""
    deadline = time.monotonic() + 5
    while True:
        tat = await _tat(client, key)
        if tat == expected or time.monotonic() > deadline:
            return tat
        await asyncio.sleep(0.01)


def _late_send_moves_schedule(redis_url: str, callers: int) -> tuple[int, int]:
    """(how far TAT moved past the slots booked, what the late reports should move it)."""
    import redis.asyncio as aioredis

    from worker.pacing.budget import SLACK_S

    late = 0.050
    # 3 slots fit in the horizon: no caller polls. The margin is pinned: 50 ms of lateness
    # would widen it (margin.py) and change the gap this arithmetic counts in.
    pacing = Pacing(rate=20, adapt=False)
    gap = int(1_000_000 / pacing.target)

    async def main() -> tuple[int, int]:
        clock = LateClock()
        pacer = RedisPacer(
            redis_url,
            pacing=pacing,
            access_key=own_key("AK-late-"),
            region="cn-north-1",
            timeout_s=5,
            clock=clock,
            sleep=clock.sleep,
            watch_s=None,
        )
        client = aioredis.Redis.from_url(redis_url)
        async with pacer:
            key = pacer._keys[0]
            await pacer.acquire()  # the first slot is "now": no wait, not late
            tat0 = await _tat(client, key)
            clock.late = late  # every caller now wakes 50 ms past its slot
            async with asyncio.TaskGroup() as tg:
                for _ in range(callers):
                    tg.create_task(pacer.acquire())
            # without reports TAT would be tat0 + callers * gap: the late sends move it on
            expected = tat0 + callers * gap + int(late * 1e6) - int(SLACK_S * 1e6)
            moved = await _tat_reaches(client, key, expected)
            assert pacer.stats()["reported_late"] == callers
        await client.aclose()
        return moved - tat0 - callers * gap, expected - tat0 - callers * gap

    return asyncio.run(main())


@pytest.mark.serial  # real sleeps against Redis's clock: a stalled loop moves the schedule
def test_late_send_moves_the_shared_schedule(redis_url: str) -> None:
    """A slot used 50 ms late (local clock injected) pushes the next free slot on Redis by the
    lateness less the slack, so the slots booked next keep whole gaps from the real send."""
    moved, expected = _late_send_moves_schedule(redis_url, callers=1)
    assert moved == expected


@pytest.mark.serial  # real sleeps against Redis's clock: a stalled loop moves the schedule
def test_a_run_of_late_sends_moves_the_schedule_once(redis_url: str) -> None:
    """Three consecutive slots all used 50 ms late push the schedule by 50 ms once, not three
    times: each report counts the slots booked after its own."""
    moved, expected = _late_send_moves_schedule(redis_url, callers=3)
    assert moved == expected


@pytest.mark.serial  # real sleeps against Redis's clock: a stalled loop moves the schedule
def test_stall_past_late_limit_lets_the_slot_go(redis_url: str) -> None:
    """A caller woken LATE_S past its slot does not send into others' slots: it books anew."""
    from worker.pacing.shared import LATE_S

    async def main() -> dict[str, float]:
        clock = LateClock()
        pacer = RedisPacer(
            redis_url,
            pacing=Pacing(rate=20),
            access_key=own_key("AK-stall-"),
            region="cn-north-1",
            timeout_s=5,
            clock=clock,
            sleep=clock.sleep,
            watch_s=None,
        )
        async with pacer:
            await pacer.acquire()
            clock.late = LATE_S + 0.01
            task = asyncio.create_task(pacer.acquire())
            while pacer.missed == 0:
                await asyncio.sleep(0.01)
            clock.late = 0.0
            await task
            return pacer.stats()

    stats = asyncio.run(main())
    assert stats["missed"] >= 1 and stats["admitted"] == 2


def test_cool_down_message_does_not_outlive_the_pacer(redis_url: str) -> None:
    """throttled() right before the pacer closes leaves no task behind (it is owned, ended on
    exit), and a cool-down that did reach Redis is seen by the next pacer on the same key."""
    ak = own_key("AK-cool-")

    async def main() -> tuple[set[asyncio.Task[Any]], str]:
        async with RedisPacer(
            redis_url, pacing=Pacing(rate=20), access_key=ak, region="cn-north-1", timeout_s=5
        ) as pacer:
            await pacer.acquire()
            pacer.throttled()
            await asyncio.sleep(0.2)  # let the message arrive
            pacer.throttled()  # and one still on its way when we leave
        left = asyncio.all_tasks() - {asyncio.current_task()}
        return left, repr(pacer)

    left, text = asyncio.run(main())
    assert left == set()
    assert "RedisPacer" in text and "admitted=1" in text


@pytest.mark.serial  # holds the loop 30 ms and asserts nothing else was late
def test_a_slow_answer_is_not_taken_for_a_late_send(redis_url: str) -> None:
    """The loop held 30 ms while a booking was on its way (a busy machine): the slot is still
    slept to on time through an earlier quick reading of Redis's clock, so nothing is reported
    late and the shared schedule does not move."""
    import redis.asyncio as aioredis

    pacing = Pacing(rate=20)
    gap = int(1_000_000 / pacing.target)

    async def main() -> tuple[int, int, float, dict[str, float]]:
        pacer = RedisPacer(
            redis_url,
            pacing=pacing,
            access_key=own_key("AK-slow-"),
            region="cn-north-1",
            timeout_s=5,
            watch_s=None,
        )
        client = aioredis.Redis.from_url(redis_url)
        async with pacer:
            key = pacer._keys[0]
            for _ in range(3):  # quick calls: readings of Redis's clock to within ~1 ms
                await pacer.acquire()
            tat0 = await _tat(client, key)
            booking = asyncio.create_task(pacer.acquire())
            await asyncio.sleep(0)  # the booking goes out...
            time.sleep(0.030)  # ...and its answer is read 30 ms after Redis read its clock
            await booking
            widest = max(m.width for m in pacer._marks)
            tat = await _tat(client, key)
            stats = pacer.stats()
        await client.aclose()
        return tat, tat0, widest, stats

    tat, tat0, widest, stats = asyncio.run(main())
    assert widest >= 0.030  # the booking really was answered late
    assert stats["reported_late"] == 0 and stats["missed"] == 0
    assert tat == tat0 + gap


@pytest.mark.parametrize("what", ["database", "credentials"])
def test_a_limiter_redis_refuses_is_a_usage_error_at_once(
    redis_url: str, sandbox: SandboxProc, tmp_path: Path, what: str
) -> None:
    """A --limiter that Redis answers with a refusal (a database number out of range, a user
    it does not know) is a mistake, not an outage: exit 2 at once, naming it (the password
    redacted), nothing sent; not a minute of polling and then 'run again later' (3)."""
    host_port = redis_url.split("//", 1)[1].split("/", 1)[0].rpartition("@")[2]
    url = (
        f"redis://{host_port}/99"
        if what == "database"
        else f"redis://nobody:s3cret-pw@{host_port}/0"
    )
    manifest = write_manifest(tmp_path / "m.jsonl", names(3))
    started = time.monotonic()
    out = run_worker(
        "run", str(manifest), "--endpoint", sandbox.url, "--limiter", url, env=cli_env(tmp_path)
    )
    assert out.returncode == 2, out.stderr
    assert time.monotonic() - started < 30  # not after --limiter-timeout (60 s)
    assert "Redis refused it" in out.stderr and "Nothing was sent" in out.stderr
    assert "s3cret-pw" not in out.stderr and "Traceback" not in out.stderr
    assert sandbox.creates() == []
