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
    for record in state.latest.values():
        if record["type"] == "intent":
            counts["in_doubt"] += 1
            continue
        counts[record["outcome"]] += 1
        if record.get("code"):
            codes[record["code"]] += 1
    unnamed_invalid = [r for r in state.invalid if not isinstance(r.get("name"), str)]
    counts["invalid"] += len(unnamed_invalid)
    codes["InvalidManifestLine"] += len(unnamed_invalid)
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
    for record in state.latest.values():
        body = record.get("body")
        not_done = record["type"] == "intent" or record.get("outcome") in NOT_DONE
        if not_done and isinstance(body, dict):
            items.append((record.get("line") or 0, orjson.dumps(body)))
    items.sort(key=lambda pair: pair[0])
    invalid = sum(1 for r in state.latest.values() if r.get("outcome") == "invalid")
    invalid += sum(1 for r in state.invalid if not isinstance(r.get("name"), str))
    return [line for _, line in items], invalid
