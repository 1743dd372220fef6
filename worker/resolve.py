"""Options -> Settings: the merged option values (options.merge) resolved into the typed
values a command runs on, with where a run's files go checked before anything is opened (the
manifest, the ledger and the files its owners keep beside it, the sandbox's account, the
metrics file) and the URLs.

Each message names where the value came from (options.Merged.origin). Loaded only by the
commands that send (it imports the session, which imports the runner).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from worker import connect
from worker.commands.sync import SyncOptions
from worker.errors import UsageError
from worker.ledger import index, lock
from worker.logfile import check_log_file
from worker.manifest.remembered import remembered_path
from worker.options import CommandLine, Merged, merge, rows, value
from worker.plan import saved
from worker.settings import CommandOptions, Pacing, RetryPolicy, Settings
from worker.urls import check_endpoint, check_limiter
from worker.userpaths import Named, check_path, check_paths


@dataclass(frozen=True, slots=True)
class Where:
    manifest: Path
    ledger: Path
    account: Path | None  # the embedded sandbox's account file


def place(line: CommandLine, merged: Merged) -> Where:
    """The manifest, the ledger (and its lock, index and spool) and the sandbox account."""
    command, values = line.command, merged.values
    given = values.get("manifest")
    if command != "export" and given is None:
        raise UsageError(f"{command}: give a MANIFEST (or a job file naming one)")
    manifest_path = Path(str(given)) if given is not None else Path("export.jsonl")
    if given is not None:
        check_path(manifest_path, merged.origin("manifest"))
    ledger_value = values.get("ledger")
    if ledger_value is None and command != "export" and _not_a_file(manifest_path):
        raise UsageError(
            f"{manifest_path} is not a regular file (a pipe?): give --ledger, "
            "since no default ledger can go beside it"
        )
    named: Named = merged.origin("ledger")
    if ledger_value is None:
        ledger_path = connect.default_ledger(manifest_path, sandbox=line.sandbox)
        named = f"the default ledger (beside {merged.origin('manifest')})"
    else:
        ledger_path = Path(str(ledger_value))
    if command != "export":
        check_paths((p, named) for p in (ledger_path, *_beside(ledger_path)))
    account = None
    if line.sandbox:
        account = line.sandbox_account or (
            Path("sandbox-account.json")
            if command == "export"
            else connect.sandbox_account_for(ledger_path)
        )
        check_path(account, "--sandbox-account")
    return Where(manifest_path, ledger_path, account)


def _not_a_file(path: Path) -> bool:
    return path.exists() and not path.is_file() and not path.is_dir()


def _beside(ledger_path: Path) -> tuple[Path, ...]:
    """The files the ledger's owners keep beside it: lock, index, remembered validation."""
    return (
        lock.lock_path(ledger_path),
        index.index_path(ledger_path),
        remembered_path(ledger_path),
    )


def check_urls(settings: Mapping[str, object], merged: Merged) -> None:
    """Checked here first so that the message names where a bad URL came from; Settings
    checks again (it is also built by tests and benchmarks), naming the flag."""
    if "endpoint" in settings:
        check_endpoint(str(settings["endpoint"]), merged.origin("endpoint"))
    if "limiter_url" in settings:
        check_limiter(str(settings["limiter_url"]), merged.origin("limiter"))


def command_options(line: CommandLine, merged: Merged, where: Where) -> CommandOptions:
    """The command's options beyond Settings: the account, the credentials profile, the
    metrics' destinations."""
    port = merged.values.get("metrics-port")  # its range was checked in options.merge
    assert port is None or isinstance(port, int)
    metrics_file = merged.values.get("metrics-file")
    if metrics_file is not None:
        from worker.metrics import check_textfile

        path = Path(str(metrics_file))
        check_path(path, merged.origin("metrics-file"))
        account = [where.account] if where.account is not None else []
        check_textfile(
            path,
            not_these=[where.ledger, *_beside(where.ledger), where.manifest, *account],
            named=merged.origin("metrics-file"),
        )
    push = merged.values.get("metrics-push")
    if push is not None:
        from worker.metrics_push import check_push_url

        check_push_url(str(push), merged.origin("metrics-push"))
    interval = value(merged, "metrics-push-interval")  # its range was checked in merge
    assert isinstance(interval, int | float)
    log_file = merged.values.get("log-file")
    if log_file is not None:
        needed = [where.manifest, where.ledger, *_beside(where.ledger)]
        if metrics_file is not None:
            needed.append(Path(str(metrics_file)))
        check_log_file(
            Path(str(log_file)),
            merged.origin("log-file"),
            not_these=needed + ([where.account] if where.account is not None else []),
        )
    profile = merged.values.get("profile")
    return CommandOptions(
        sandbox_account=where.account,
        profile=str(profile) if profile is not None else None,
        retry_rejected=bool(merged.values.get("retry-rejected")),
        json=line.json,
        job_name=_stem(line.job or where.manifest),
        metrics_file=Path(str(metrics_file)) if metrics_file is not None else None,
        log_file=Path(str(log_file)) if log_file is not None else None,
        metrics_port=port,
        metrics_host=str(value(merged, "metrics-host")),
        metrics_push=str(push) if push is not None else None,
        metrics_push_interval_s=float(interval),
    )


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".jsonl", ".toml"):
        name = name.removesuffix(suffix)
    return name


@dataclass(frozen=True, slots=True, kw_only=True)
class Resolved:
    """Everything a command needs from its options, typed."""

    settings: Settings
    options: CommandOptions
    sync: SyncOptions | None  # sync's own options; None for run and export


def resolve(line: CommandLine, environ: Mapping[str, str]) -> Resolved:
    """Settings and the command's options, from the command line, its job file and the
    environment; a UsageError names the option and where its value came from."""
    if line.command == "sync" and line.json and not (line.dry_run or line.check):
        raise UsageError("--json prints a plan: give it with --dry-run or --check")
    merged = merge(line, environ)
    reviewed = _reviewed_plan(line, merged)
    where = place(line, merged)
    _check_plan_out(merged, where)
    owned: dict[str, dict[str, object]] = {"settings": {}, "pacing": {}, "retry": {}}
    for o in rows(line.command):
        if o.flag in merged.values and o.owner in owned and o.flag != "ledger":
            owned[o.owner][o.field] = merged.values[o.flag]
    check_urls(owned["settings"], merged)
    settings = Settings(
        manifest=where.manifest,
        ledger=where.ledger,
        pacing=Pacing(**owned["pacing"]),  # type: ignore[arg-type]
        retry=RetryPolicy(**owned["retry"]),  # type: ignore[arg-type]
        dry_run=line.dry_run,
        **owned["settings"],  # type: ignore[arg-type]
    )
    return Resolved(
        settings=settings,
        options=command_options(line, merged, where),
        sync=_sync_options(line, merged, reviewed) if line.command == "sync" else None,
    )


def _sync_options(
    line: CommandLine, merged: Merged, reviewed: tuple[Path, saved.Saved] | None
) -> SyncOptions:
    # With --plan the plan's options are the defaults: one given that differs makes the
    # plan stale (refused, named), never silently ignored.
    planned: dict[str, object] = {}
    if reviewed is not None:
        o = reviewed[1].options
        planned = {
            "prune": o.prune,
            "scope-project": list(o.scope_projects),
            "scope-match": o.scope_match,
            "max-delete": o.max_delete,
            "replace-conflicts": o.replace_conflicts,
        }
    shaped = Merged({**planned, **merged.values}, merged.origins)
    projects = value(shaped, "scope-project") or ()
    match = value(shaped, "scope-match")
    max_delete = value(shaped, "max-delete")
    plan_out = merged.values.get("plan-out")
    assert isinstance(projects, list | tuple) and isinstance(max_delete, int)
    return SyncOptions.build(
        prune=bool(value(shaped, "prune")),
        projects=[str(p) for p in projects],
        match=str(match) if match is not None else None,
        max_delete=max_delete,
        check=line.check,
        plan_out=Path(str(plan_out)) if plan_out is not None else None,
        plan=reviewed[1] if reviewed is not None else None,
        plan_path=reviewed[0] if reviewed is not None else None,
        yes=bool(value(merged, "yes")),
        verbose=line.verbose,
        replace=bool(value(shaped, "replace-conflicts")),
    )


def _reviewed_plan(line: CommandLine, merged: Merged) -> tuple[Path, saved.Saved] | None:
    """`sync --plan PLAN`: the plan file read and checked, and its manifest made the run's."""
    plan_out, given = merged.values.get("plan-out"), merged.values.get("plan")
    if plan_out is not None and not line.dry_run:
        raise UsageError(f"{merged.origin('plan-out')} saves a dry run's plan: add --dry-run")
    if given is None:
        return None
    path, origin = Path(str(given)), merged.origin("plan")
    check_path(path, origin)
    for flag, on in (("--dry-run", line.dry_run), ("--check", line.check), ("--json", line.json)):
        if on:
            raise UsageError(f"{origin} carries out a saved plan: {flag} cannot go with it")
    if plan_out is not None:
        raise UsageError(f"{origin} carries out a saved plan: --plan-out cannot go with it")
    if line.manifest is not None:
        raise UsageError(f"{origin} names its manifest: give no MANIFEST with it")
    reviewed = saved.read(path)
    named = merged.values.get("manifest")
    if named is not None and os.path.abspath(str(named)) != reviewed.manifest_path:
        raise UsageError(
            f"{merged.origin('manifest')} {named} is not the manifest of {origin} "
            f"({reviewed.manifest_path})"
        )
    merged.values["manifest"] = Path(reviewed.manifest_path)
    merged.origins["manifest"] = f"the manifest of {origin} {path}"
    return path, reviewed


def _check_plan_out(merged: Merged, where: Where) -> None:
    """--plan-out: a path that can be written, and none of the run's own files."""
    plan_out = merged.values.get("plan-out")
    if plan_out is None:
        return
    path, origin = Path(str(plan_out)), merged.origin("plan-out")
    check_path(path, origin)
    own = [where.manifest, where.ledger, *_beside(where.ledger)]
    if where.account is not None:
        own.append(where.account)
    if os.path.abspath(path) in {os.path.abspath(p) for p in own}:
        raise UsageError(f"{origin} {path} is one of the run's own files; name another")
