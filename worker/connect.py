"""Where requests go and as whom: the keys, the target the ledger records, the endpoint or the
embedded sandbox (--sandbox), the rate budget (local or shared through Redis), the transport
and a Runner on them. session.carry_out opens these; nothing here knows a command."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import structlog

from worker.api import credentials
from worker.api.signing import Credentials
from worker.api.transport import MAX_BODY_BYTES, Reachability, Transport
from worker.errors import LedgerWriteError, UsageError
from worker.ledger.journal import Ledger
from worker.ledger.records import Target
from worker.metrics import Metrics
from worker.pacing.budget import Pacer
from worker.pacing.local import LocalPacer
from worker.plan import rounds
from worker.runner.concurrency import machine_cap
from worker.runner.controls import Controls
from worker.runner.dispatch import Journal, Runner
from worker.runner.stamps import utcnow
from worker.settings import CommandOptions, Settings
from worker.urls import redact_url

log = structlog.get_logger("worker")

# A List page of 1000 groups with their tags can pass the transport's 1 MiB default.
LIST_BODY_BYTES = 16 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class Hooks:
    """Time and the places a test may fault, handed to everything the session opens; nothing
    below the session reads a clock or the environment on its own."""

    wall: Callable[[], datetime] = utcnow  # X-Date and the ledger's times
    clock: Callable[[], float] = time.monotonic  # durations, deadlines, pacing
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    ledger: type[Ledger] = Ledger  # its `open`: the ledger a run appends to
    unreachable_s: float = Reachability().window_s  # silence before the run gives up
    fresh_s: float = rounds.FRESH_S  # how long a listing may serve deletes


HOOKS = Hooks()  # the real ones; tests/hooks/sitecustomize.py replaces them in a test's worker


def default_ledger(manifest: Path, *, sandbox: bool) -> Path:
    """groups.jsonl -> groups.ledger.jsonl beside it; with --sandbox groups.sandbox.ledger.jsonl,
    so that a sandbox run never writes the ledger a real run would use by default."""
    name = manifest.name
    stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
    return manifest.with_name(f"{stem}{'.sandbox' if sandbox else ''}.ledger.jsonl")


def sandbox_account_for(ledger_path: Path) -> Path:
    """The embedded sandbox's account file that goes with a ledger: beside it."""
    name = ledger_path.name
    stem = name[: -len(".ledger.jsonl")] if name.endswith(".ledger.jsonl") else name
    return ledger_path.with_name(f"{stem}.account.json")


@dataclass(frozen=True, slots=True)
class Account:
    """Where requests go and as whom: the settings (endpoint filled in), keys, target."""

    settings: Settings
    credentials: Credentials
    target: Target


def target_of(settings: Settings, creds: Credentials | None, options: CommandOptions) -> Target:
    if options.sandbox_account is not None:
        return Target(
            endpoint=f"sandbox:{options.sandbox_account.resolve()}",
            region=settings.region,
            access_key="sandbox",
        )
    assert creds is not None
    return Target(
        endpoint=redact_url(settings.endpoint), region=settings.region, access_key=creds.access_key
    )


def load_credentials(
    settings: Settings, options: CommandOptions
) -> tuple[Settings, Credentials | None, str]:
    """The keys to sign with and where they came from (never the secret).

    A region the source names (a `ve` profile's, VOLCENGINE_REGION) is not applied: the Live
    API signs in cn-north-1 whatever region a profile was made for, and a profile's
    cn-beijing would fail every request. It is only reported when it differs."""
    if options.sandbox_account is not None:
        return settings, None, "the embedded sandbox's keys"
    loaded = credentials.load(os.environ, Path.home(), profile=options.profile)
    if loaded.region and loaded.region != settings.region:
        log.warning(
            "credentials.region_ignored",
            source=loaded.source,
            source_region=loaded.region,
            region=settings.region,
            hint="the Live API signs in --region (default cn-north-1)",
        )
    return settings, loaded.credentials, loaded.source


@contextlib.asynccontextmanager
async def account_for(
    settings: Settings, creds: Credentials | None, target: Target, options: CommandOptions
) -> AsyncIterator[Account]:
    """The real endpoint with the user's keys, or the embedded sandbox (--sandbox)."""
    if options.sandbox_account is None:
        assert creds is not None
        yield Account(settings, creds, target)
        return
    from worker import sandbox  # only --sandbox pays for the server

    config = sandbox.SandboxConfig(
        rate=int(settings.pacing.rate), state_file=options.sandbox_account
    )
    finished = False
    try:
        async with sandbox.serve(config) as sb:
            ak, sk = next(iter(sb.keys.items()))
            log.info("sandbox.started", url=sb.url, account=str(options.sandbox_account))
            yield Account(
                replace(settings, endpoint=sb.url),
                Credentials(access_key=ak, secret_key=sk),
                target,
            )
            finished = True
    except UsageError as exc:
        if not finished:
            raise  # a bad account file at start: nothing was sent
        # Saving the account failed after requests went out: not "nothing was sent".
        raise LedgerWriteError(f"the sandbox account was not saved: {exc}") from None


@contextlib.asynccontextmanager
async def _pacer(settings: Settings, creds: Credentials) -> AsyncIterator[Pacer]:
    """The in-process budget, or the one shared through Redis (--limiter)."""
    if not settings.limiter_url:
        yield LocalPacer(settings.pacing)
        return
    from worker.pacing.shared import RedisPacer  # only runs with --limiter pay for redis-py

    async with RedisPacer(
        settings.limiter_url,
        pacing=settings.pacing,
        access_key=creds.access_key,
        region=settings.region,
        timeout_s=settings.limiter_timeout_s,
    ) as shared:
        log.info("limiter.shared", limiter=redact_url(settings.limiter_url))
        yield shared


@contextlib.asynccontextmanager
async def runner_for(
    account: Account,
    *,
    hooks: Hooks,
    book: Journal | None,
    controls: Controls,
    run_id: str,
    metrics: Metrics | None = None,
    lists: bool = True,
) -> AsyncIterator[Runner]:
    """A runner on the account. `lists`: it reads List pages, whose answers can be large;
    create-only runs keep the transport's 1 MiB bound on every answer."""
    settings = account.settings
    async with (
        _pacer(settings, account.credentials) as pacer,
        Transport(
            settings.endpoint,
            timeout_s=settings.timeout_s,
            max_connections=machine_cap(settings.concurrency),
            max_body_bytes=LIST_BODY_BYTES if lists else MAX_BODY_BYTES,
        ) as transport,
    ):
        yield Runner(
            settings=settings,
            credentials=account.credentials,
            sender=transport,
            pacer=pacer,
            ledger=book,
            controls=controls,
            run_id=run_id,
            clock=hooks.clock,
            sleep=hooks.sleep,
            wall=hooks.wall,
            metrics=metrics,
            reachability=Reachability(window_s=hooks.unreachable_s),
        )
