"""`sync --dry-run --plan-out PLAN` and `sync --plan PLAN`: a sync's plan as a saved plan
(plan/saved.py), and the refusal of a saved plan that no longer is the plan.

`sync --plan` compares twice: before any request (the target, the options, the manifest's
sha256) and after the listing (every change and the account state it was planned from).
Either difference ends the command with PlanRefused (exit 2): nothing was written.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from worker.api.account import Listed
from worker.errors import PlanRefused
from worker.manifest import spool
from worker.manifest.values import Scan
from worker.plan import reconcile, saved
from worker.runner.stamps import stamp
from worker.session import Opened
from worker.userpaths import shown_path

SHOWN_DIFFERENCES = 3  # the first differences a stale plan's message names


def saved_plan(
    opened: Opened,
    options: saved.PlanOptions,
    scan: Scan,
    the_plan: reconcile.SyncPlan,
    groups: Mapping[str, Listed],
) -> saved.Saved:
    """The plan as a plan file holds it: every change, from the manifest streamed again."""
    changes = reconcile.iter_changes(the_plan, spool.read(scan), groups)
    counts = {k: v for k, v in the_plan.counts.items() if k not in ("listed", "invalid")}
    return saved.Saved(
        created=stamp(opened.runner.wall()),
        target=opened.target,
        manifest_path=os.path.abspath(scan.path),
        manifest_sha256=scan.sha256,
        options=options,
        counts=counts,
        changes=saved.changes_of(changes),
    )


def refuse_stale(
    reviewed: saved.Saved,
    plan_path: Path | None,
    plan_options: saved.PlanOptions,
    opened: Opened,
    scan: Scan,
    the_plan: reconcile.SyncPlan | None,
    groups: Mapping[str, Listed],
) -> None:
    """PlanRefused naming the first differences between `reviewed` and the plan made now.
    `the_plan` None: before the listing, only the target, options and manifest compare."""
    if the_plan is None:
        fresh = dataclasses.replace(
            reviewed,
            target=opened.target,
            manifest_sha256=scan.sha256,
            options=plan_options,
        )
    else:
        fresh = saved_plan(opened, plan_options, scan, the_plan, groups)
    found = list(saved.differences(reviewed, fresh))
    if not found:
        return
    more = len(found) - SHOWN_DIFFERENCES
    said = "; ".join(found[:SHOWN_DIFFERENCES]) + (f"; and {more} more" if more > 0 else "")
    named = f"--plan {shown_path(plan_path)}: " if plan_path is not None else ""
    raise PlanRefused(
        f"{named}plan is stale: {said}; make a new plan (sync --dry-run --plan-out); "
        "nothing was sent"
    )


def written_names(reviewed: saved.Saved) -> frozenset[str]:
    """The Names a saved plan writes: its creates, updates, deletes and replaces (conflicts
    are reported, never written)."""
    return frozenset(
        name
        for kind in ("create", "update", "delete", "replace")
        for name in reviewed.changes[kind]
    )
