"""`worker sandbox`: its options and its foreground process. The server itself (aiohttp.web)
is imported only when the sandbox starts, so `worker --help` and the other commands never
load it."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from worker.api import spec
from worker.errors import UsageError
from worker.sandbox.config import FAULTS, LIST_ORDERS, SandboxConfig


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    s.add_argument(
        "--rate",
        type=int,
        default=spec.DOCUMENTED_RATE,
        help="requests per sliding second per access key, all actions together",
    )
    s.add_argument("--keys", help="AK:SK[,AK:SK...] (default: a throwaway pair, printed)")
    s.add_argument("--fault-rate", type=float, default=0.0)
    s.add_argument("--ambiguous-rate", type=float, default=0.0)
    s.add_argument("--faults", help=f"comma list of fault kinds (default all: {','.join(FAULTS)})")
    s.add_argument("--latency-ms", default="0-0", help="A-B, uniform (default 0-0)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--log", help="arrival log, JSONL")
    s.add_argument("--forbid", help="regex: a write about a matching Name or ProjectName gets 403")
    s.add_argument("--hang", type=float, default=60.0, help="seconds a `hang` fault lasts")
    s.add_argument("--max-skew", type=float, default=900.0, help="X-Date tolerance, seconds")
    s.add_argument(
        "--clock-offset",
        type=float,
        default=0.0,
        help="seconds the sandbox's clock is ahead of the real one",
    )
    s.add_argument("--preload", help="a manifest (JSONL) whose groups exist at start")
    s.add_argument(
        "--list-lag-ms",
        type=float,
        default=0.0,
        help="List sees the account as it was this many ms ago (default 0)",
    )
    s.add_argument(
        "--list-churn",
        type=int,
        default=0,
        help="after each of the first K List pages, one new group appears",
    )
    s.add_argument(
        "--list-order",
        choices=LIST_ORDERS,
        default="created",
        help="creation order, newest first, or a new random order on every List call",
    )
    s.add_argument(
        "--churn-every",
        type=float,
        default=0.0,
        metavar="S",
        help="another party creates a group every S seconds and deletes one S/2 later",
    )
    s.add_argument(
        "--timeout-first-create",
        action="store_true",
        help="each Name's first create is carried out, then answered 504 (ambiguous)",
    )
    s.add_argument("--state-file", help="keep the account and keys here between runs (JSON)")


def config_from(args: argparse.Namespace) -> SandboxConfig:
    return SandboxConfig(
        host=args.host,
        port=args.port,
        rate=args.rate,
        keys=dict(_pair(p) for p in args.keys.split(",")) if args.keys else {},
        fault_rate=args.fault_rate,
        ambiguous_rate=args.ambiguous_rate,
        latency_ms=_range(args.latency_ms),
        seed=args.seed,
        log=Path(args.log) if args.log else None,
        forbid=args.forbid,
        hang_s=args.hang,
        max_skew_s=args.max_skew,
        clock_offset_s=args.clock_offset,
        faults=tuple(args.faults.split(",")) if args.faults else FAULTS,
        preload=Path(args.preload) if args.preload else None,
        list_lag_ms=args.list_lag_ms,
        list_churn=args.list_churn,
        list_order=args.list_order,
        churn_every_s=args.churn_every,
        timeout_first_create=args.timeout_first_create,
        state_file=Path(args.state_file) if args.state_file else None,
    )


def main(args: argparse.Namespace) -> int:
    # Without --keys, serve() takes the state file's pair or makes a throwaway one.
    asyncio.run(_serve(config_from(args)))
    return 0


async def _serve(config: SandboxConfig) -> None:
    from worker.sandbox.app import serve  # the server loads only here

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serve(config) as sb:
        print(f"sandbox listening on {sb.url}", flush=True)
        for ak, sk in sb.keys.items():
            print(f"credentials: VOLC_ACCESSKEY={ak} VOLC_SECRETKEY={sk}", flush=True)
        print(
            f"try: VOLC_ACCESSKEY=... VOLC_SECRETKEY=... python -m worker run MANIFEST "
            f"--endpoint {sb.url}",
            flush=True,
        )
        await stop.wait()
    print("sandbox stopped", flush=True)


def _pair(text: str) -> tuple[str, str]:
    ak, sep, sk = text.partition(":")
    if not (sep and ak and sk):
        raise UsageError(f"--keys: expected AK:SK, got {ak or '?'}:...")
    return ak, sk


def _range(text: str) -> tuple[float, float]:
    lo, sep, hi = text.partition("-")
    try:
        a, b = float(lo), float(hi if sep else lo)
    except ValueError:
        raise UsageError(f"--latency-ms: expected A-B in milliseconds, got {text!r}") from None
    if not 0 <= a <= b:
        raise UsageError("--latency-ms: need 0 <= A <= B")
    return a, b
