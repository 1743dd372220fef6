"""Report: what a ledger says, across all its runs, per Name (the latest word wins)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson

from worker.ledger import OUTCOMES, State

NOT_DONE = ("rejected", "deferred")


def summarize(state: State) -> dict[str, Any]:
    """Counts per outcome and per code. `total` is the item count of the latest run's
    manifest; `pending` is what of it has no final result (never sent, or in doubt)."""
    counts: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    for entry in state.latest.values():
        if entry.outcome is None:
            counts["in_doubt"] += 1
            continue
        counts[entry.outcome] += 1
        if entry.code:
            codes[entry.code] += 1
    counts["invalid"] += state.unnamed_invalid
    codes["InvalidManifestLine"] += state.unnamed_invalid
    header = state.runs[-1] if state.runs else {}
    total = int(header.get("items", 0))
    final = sum(counts[o] for o in OUTCOMES)
    summary: dict[str, Any] = {"total": total}
    summary.update({o: counts[o] for o in OUTCOMES})
    summary["pending"] = max(0, total - final)
    summary["in_doubt"] = counts["in_doubt"]
    summary["codes"] = dict(sorted(codes.items()))
    summary["runs"] = len(state.runs)
    summary["last_run"] = {
        "run_id": header.get("run_id"), "started": header.get("started"),
        "manifest": header.get("manifest"), "finished": (state.footer or {}).get("finished"),
        "interrupted": (state.footer or {}).get("interrupted"),
        "completed": state.footer is not None,
    }
    return summary


def render(summary: dict[str, Any]) -> str:
    lines = [f"{'total':<10}{summary['total']:>8}"]
    lines += [f"{k:<10}{summary[k]:>8}" for k in (*OUTCOMES, "pending")]
    if summary["in_doubt"]:
        lines.append(f"  ({summary['in_doubt']} of the pending were sent without a recorded "
                     "answer; the next run sends them again)")
    if summary["codes"]:
        lines.append("codes:")
        lines += [f"  {code:<36}{n:>8}" for code, n in summary["codes"].items()]
    last = summary["last_run"]
    if last["run_id"]:
        state = ("interrupted" if last["interrupted"] else "finished") if last["completed"] \
            else "did not finish (killed or crashed)"
        lines.append(f"last run {last['run_id']} started {last['started']}: {state}")
    return "\n".join(lines)


def failed_manifest(state: State) -> tuple[list[bytes], int]:
    """Manifest lines (JSON bytes) of every item not done, in manifest order, and the number
    of invalid lines that cannot be listed (they have no valid body to give)."""
    items = []
    for entry in state.latest.values():
        not_done = entry.in_doubt or entry.outcome in NOT_DONE
        if not_done and isinstance(entry.body, dict):
            items.append((entry.line, orjson.dumps(entry.body)))
    items.sort(key=lambda pair: pair[0])
    invalid = state.unnamed_invalid + sum(
        1 for e in state.latest.values() if e.outcome == "invalid")
    return [line for _, line in items], invalid
