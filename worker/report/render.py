"""The report's summary as text for a terminal (`--json` prints the summary itself)."""

from __future__ import annotations

from typing import Any, Final

from worker.report.status import STATUSES
from worker.report.sync_audit import DELETED_LISTED

RUNS_SHOWN: Final = 10  # runs in the text report (all of them in --json)
DELETED_SHOWN: Final = 10  # deleted Names in the text report
CONFLICTS_SHOWN: Final = 10  # conflicts in the text report


def render(summary: dict[str, Any]) -> str:
    """The summary as text for a terminal."""
    lines = []
    if summary["note"]:
        lines.append(summary["note"])
    lines.append(f"{'total':<12}{summary['total']:>8}")
    for status in STATUSES:
        n = summary[status]
        if status == "pending" and n is None:
            continue
        if n or status in ("created", "exists", "rejected", "deferred", "invalid", "pending"):
            label = status.replace("_", " ")  # in doubt, in sync
            lines.append(f"{label:<12}{n:>8}")
    if summary["in_doubt"]:
        lines.append(
            f"  ({summary['in_doubt']} sent without a recorded answer; the next run sends "
            "them again, the next sync lists them first)"
        )
    if summary["in_sync"]:
        lines.append(
            f"  ({summary['in_sync']} found in sync with the account by the last sync: "
            "nothing to send)"
        )
    if summary["actions"]:
        over_results = summary.get("actions_over") == "results"
        lines.append("by action (every result of every run):" if over_results else "by action:")
        lines += [f"  {k:<28}{n:>8}" for k, n in summary["actions"].items()]
    lines += _named("deleted", summary.get("deletes"))
    lines += _named(
        "already gone (delete answered ResourceNotFound)", summary.get("already_gone_deletes")
    )
    conflicts = summary.get("conflicts") or []
    if conflicts:
        lines.append(f"conflicts ({summary['conflict']}):")
        lines += [
            f"  line {c['line']}: {c['name']}: {c['reason']}" for c in conflicts[:CONFLICTS_SHOWN]
        ]
        if (more := summary["conflict"] - min(len(conflicts), CONFLICTS_SHOWN)) > 0:
            lines.append(f"  and {more} more (report --failed lists every one)")
    if summary["codes"]:
        lines.append("codes:")
        lines += [f"  {code:<36}{n:>8}" for code, n in summary["codes"].items()]
    runs = summary["runs"]
    if runs:
        shown = runs[-RUNS_SHOWN:]
        lines.append(
            f"runs ({len(runs)}; the last {len(shown)}):"
            if len(runs) > len(shown)
            else f"runs ({len(runs)}):"
        )
        lines += [f"  {_run_line(run)}" for run in shown]
        last = runs[-1]
        lines.append(f"last run {last['run_id']} started {last['started']}: {last['ended']}")
    return "\n".join(lines)


def _named(label: str, deletes: dict[str, Any] | None) -> list[str]:
    """`label (n): the first names`, when there are any."""
    if not deletes or not deletes["total"]:
        return []
    shown = ", ".join(deletes["names"][:DELETED_SHOWN])
    more = deletes["total"] - min(len(deletes["names"]), DELETED_SHOWN)
    return [
        f"{label} ({deletes['total']}): {shown}"
        + (f" and {more} more (--json lists up to {DELETED_LISTED})" if more else "")
    ]


def _run_line(run: dict[str, Any]) -> str:
    parts = [run["run_id"], run["command"], run["started"], run["state"]]
    if run["exit_code"] is not None:
        parts.append(f"exit {run['exit_code']}")
    if run["stopped_by"]:
        parts.append(f"by {run['stopped_by']}")
    if run["duration_s"] is not None:
        parts.append(f"{run['duration_s']:.1f} s")
    if run["rate_achieved"] is not None and run["rate_limit"]:
        parts.append(
            f"{run['rate_achieved']:.2f}/s of {run['rate_limit']:g}/s "
            f"({run['rate_achieved'] / run['rate_limit']:.0%})"
        )
    if run["throttles"] is not None:
        parts.append(f"{run['throttles']} throttled")
    return "  ".join(parts)
