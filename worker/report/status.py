"""Report: what a ledger says about its runs and about each line of the last run's manifest.

Counts are about a manifest, line by line, never about every Name the ledger ever saw: a
ledger outlives manifests (lines removed, Names renamed), and "created 13 of total 10" is a
lie. Which manifest: `--manifest PATH` if given; else the one the last run header names, if
it is still a regular file whose sha256 is the one recorded; else none, and the counts say
they cover every Name the ledger has recorded (`scope: "ledger"`, no `pending`).

Per manifest line, the status is: `invalid` (the line does not validate; kept per line, so a
duplicate Name's invalid line is never hidden by the valid line's result), `pending` (never
sent, or the line changed since a result that was not done), `in_doubt` (sent, no answer
recorded), `in_sync` (below), or the outcome of the Name's latest result.

A sync records nothing for a line it found in sync with the account. So when the last run is
a sync that went through every item (footer, not stopped) and the manifest counted against is
the one it used, a line it recorded nothing for is `in_sync` (done), whatever an earlier run
said of its Name (the sync listed the account after that and found the line as it says);
after a sync that was stopped, interrupted or crashed, such a line may simply not have been
reached, and stays what the ledger says. A sync that ended with exit 0 checked the account
against every line, so none of its lines is left pending or in doubt either.

A delete is no manifest line: on a ledger holding a sync, `actions` counts every result of
every run (so a prune's deletes show), `deletes` names what was deleted, and a delete
answered ResourceNotFound (a lagging listing showed a group already deleted) is `already
gone` (`delete/already_gone`), not a delete. A manifest line whose Name was deleted is not
done: the next run or sync creates it again. A conflict is reported with the sync's own
words, which name both projects. That needs a second, streaming pass over the ledger
(`audit_of`), made only for ledgers holding a sync.

gather.py does the I/O (read the ledger, probe its lock, find the manifest); `summary_of` and
`failures_of` here are pure; render.py and commands/report.py print.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from worker.ledger.records import DONE, Footer, Latest, Outcome, RunHeader, StopReason
from worker.ledger.state import State
from worker.manifest.values import Group, Invalid
from worker.report.sync_audit import Audit, already_gone

# Every status a manifest line (or, without a manifest, a Name) can have, in the order
# reports list them. `already_gone`: a delete answered ResourceNotFound (only without a
# manifest: a manifest line whose Name was deleted is `pending`).
STATUSES: Final = (*(o.value for o in Outcome), "already_gone", "in_sync", "pending", "in_doubt")
# The statuses that count as done: the done outcomes, and a line a finished sync found in sync.
DONE_STATUSES: Final = frozenset({*(o.value for o in DONE), "already_gone", "in_sync"})
CONFLICTS_LISTED: Final = 1000  # conflicts listed in --json (the count covers them all)

_STOPPED: Final = {
    StopReason.LIMITER: "stopped: the shared limiter stayed unreachable",
    StopReason.UNREACHABLE: "stopped: the endpoint gave no HTTP answer",
    StopReason.ABORTED: "stopped: the server refused the run (credentials, permission, clock)",
    StopReason.LEDGER: "stopped: a ledger write failed",
    StopReason.LISTING: "stopped: the account could not be listed completely",
    StopReason.ERROR: "stopped: an internal error",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure:
    """A manifest line that is not done, and why."""

    line: int
    name: str | None
    status: str  # a STATUSES value other than the done outcomes
    reason: str
    body: bytes | None  # the canonical line to send again; None for an invalid line


# -- the pure core ------------------------------------------------------------------------


def status_of(
    item: Group | Invalid, latest: Mapping[str, Latest], audit: Audit | None = None
) -> tuple[str, str]:
    """(status, reason) of one manifest line given the ledger's latest word per Name (and,
    for a ledger holding a sync, its Audit)."""
    if isinstance(item, Invalid):
        return (
            "invalid",
            f"invalid: {item.problem.field}: {item.problem.reason}"
            if item.problem.field
            else f"invalid: {item.problem.reason}",
        )
    return status_given(item, latest.get(item.name), audit)


def status_given(item: Group, entry: Latest | None, audit: Audit | None) -> tuple[str, str]:
    """status_of, for a line whose ledger entry was looked up already."""
    if audit is not None and audit.in_sync(item.name, entry):
        return "in_sync", ""
    if entry is None:
        return "pending", "pending: never sent"
    if entry.outcome is None:
        return "in_doubt", IN_DOUBT
    if entry.outcome is Outcome.DELETED:
        # The line asks for the group; the ledger's last word is that it is gone.
        return "pending", "pending: the group was deleted since; the next run or sync creates it"
    if entry.done:
        return str(entry.outcome), ""
    # A conflict recorded without a fingerprint (nothing was sent) says nothing of a change.
    unknown = entry.outcome is Outcome.CONFLICT and entry.fingerprint is None
    if entry.outcome is Outcome.INVALID or (entry.fingerprint != item.fingerprint and not unknown):
        return "pending", f"pending: {entry.outcome} before, and the line has changed since"
    return str(entry.outcome), _reason(item.name, entry, audit)


IN_DOUBT: Final = (
    "in doubt: sent, but no answer was recorded; the next run sends it again, the next "
    "sync lists it first (an 'already exists' answer or the listing confirms it)"
)


def _reason(name: str, entry: Latest, audit: Audit | None) -> str:
    code = f" ({entry.code})" if entry.code else ""
    match entry.outcome:
        case Outcome.REJECTED:
            return (
                f"rejected{code}: fix the line, or rerun with --retry-rejected once the "
                "cause is fixed"
            )
        case Outcome.DEFERRED:
            return f"deferred{code}: out of attempts or time, or stopped; run again later"
        case Outcome.VANISHED:
            return "vanished: the group was gone when it was updated; the next sync creates it"
        case Outcome.CONFLICT:
            said = audit.conflicts.get(name) if audit is not None else None
            return f"conflict{code}: {said or 'the account holds it in another project'}"
        case _:
            return f"{entry.outcome}{code}"


def _status_of_name(entry: Latest) -> str:
    """A Name's status without a manifest: its latest word."""
    if entry.outcome is None:
        return "in_doubt"
    if already_gone(entry.action, entry.outcome, entry.code):
        return "already_gone"
    return str(entry.outcome)


@dataclass(slots=True)
class _Tally:
    """The counts `summary_of` adds up, line by line (or Name by Name)."""

    counts: Counter[str] = field(default_factory=Counter)
    actions: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    conflicts: list[dict[str, Any]] = field(default_factory=list)  # the first CONFLICTS_LISTED

    def add(self, status: str, entry: Latest | None) -> None:
        self.counts[status] += 1
        # The latest word is the line's status: count its action and code with it.
        if entry is not None and entry.outcome is not None and status == _status_of_name(entry):
            self.actions[f"{entry.action or 'none'}/{status}"] += 1
            if entry.code:
                self.codes[entry.code] += 1

    def conflict(self, line: int, name: str, reason: str) -> None:
        if len(self.conflicts) < CONFLICTS_LISTED:
            self.conflicts.append({"line": line, "name": name, "reason": reason})


def summary_of(
    state: State,
    *,
    items: Iterable[Group | Invalid] | None,
    locked: bool | None,
    note: str = "",
    audit: Audit | None = None,
) -> dict[str, Any]:
    """Counts per status (with `items`: per manifest line; without: per Name recorded), per
    "action/outcome" (per line; with `audit`, a ledger holding a sync: per result of every
    run, deletes included) and per answer code; the conflicts, with both projects; every
    run with how it ended."""
    tally = _Tally()
    if items is not None:
        get = state.latest.get
        for item in items:
            if isinstance(item, Invalid):
                tally.codes["InvalidManifestLine"] += 1
                tally.counts["invalid"] += 1
                continue
            entry = get(item.name)  # once per line: millions of lookups
            status, reason = status_given(item, entry, audit)
            tally.add(status, entry)
            if status == "conflict":
                tally.conflict(item.line, item.name, reason)
    else:
        for entry in state.latest.values():
            if entry.outcome is not Outcome.INVALID:  # invalid lines are counted by line
                tally.add(_status_of_name(entry), entry)
        tally.counts["invalid"] += len(state.invalid_lines)
        tally.codes["InvalidManifestLine"] += len(state.invalid_lines)
        for name in audit.conflicts if audit is not None else {}:
            entry = state.latest.get(name)
            if entry is not None and entry.outcome is Outcome.CONFLICT:
                tally.conflict(entry.line, name, _reason(name, entry, audit))
    return _summary(state, tally, scoped=items is not None, note=note, audit=audit, locked=locked)


def _summary(
    state: State,
    tally: _Tally,
    *,
    scoped: bool,
    note: str,
    audit: Audit | None,
    locked: bool | None,
) -> dict[str, Any]:
    counts = tally.counts
    summary: dict[str, Any] = {
        "scope": "manifest" if scoped else "ledger",
        "note": note,
        "total": sum(counts.values()),
    }
    summary.update({s: counts[s] for s in STATUSES})
    if not scoped:
        summary["pending"] = None  # unknowable without a manifest
    summary["done"] = sum(counts[s] for s in DONE_STATUSES)
    summary["not_done"] = summary["total"] - summary["done"]
    summary["actions"] = dict(sorted(tally.actions.items()))
    summary["actions_over"] = "lines"
    if audit is not None:
        summary["actions"] = dict(audit.actions)
        summary["actions_over"] = "results"
        summary["deletes"] = {"total": audit.deleted, "names": list(audit.deleted_names)}
        summary["already_gone_deletes"] = {"total": audit.gone, "names": list(audit.gone_names)}
    summary["conflicts"] = tally.conflicts
    summary["codes"] = {k: v for k, v in sorted(tally.codes.items()) if v}
    runs = [
        _run(h, state.footers.get(h.run_id), last=i == len(state.runs) - 1, locked=locked)
        for i, h in enumerate(state.runs)
    ]
    summary["runs"] = runs
    summary["last_run"] = runs[-1] if runs else None
    summary["locked"] = locked
    return summary


def _run(
    header: RunHeader, footer: Footer | None, *, last: bool, locked: bool | None
) -> dict[str, Any]:
    """One run as the report shows it: when, how it ended, its pacing."""
    if footer is not None:
        state = (
            "finished"
            if footer.stopped_by is None
            else "interrupted"
            if footer.stopped_by is StopReason.SIGNAL
            else "stopped"
        )
        ended = {
            "finished": "finished",
            "interrupted": "interrupted by a signal (resumable)",
            "stopped": _STOPPED.get(footer.stopped_by, "stopped"),  # type: ignore[arg-type]
        }[state]
    elif last and locked:
        state, ended = "running", "running (another process holds the ledger's lock)"
    elif last and locked is None:
        state, ended = "unknown", "running, killed or crashed (its lock cannot be probed)"
    else:
        state, ended = "crashed", "did not finish (killed or crashed): run again to resume"
    rate = header.settings.get("rate")
    return {
        "run_id": header.run_id,
        "command": header.command,
        "started": header.started,
        "version": header.version,
        "manifest": header.manifest,
        "items": header.items,
        "target": str(header.target),
        "state": state,
        "ended": ended,
        "stopped_by": str(footer.stopped_by) if footer and footer.stopped_by else None,
        "finished": footer.finished if footer else None,
        "exit_code": footer.exit_code if footer else None,
        "duration_s": footer.duration_s if footer else None,
        "rate_limit": footer.rate_limit
        if footer
        else (float(rate) if isinstance(rate, int | float) else None),
        "rate_achieved": footer.rate_achieved if footer else None,
        "requests": footer.requests if footer else None,
        "throttles": footer.throttles if footer else None,
        "retries": footer.retries if footer else None,
        "outcomes": footer.outcomes if footer else None,
    }


def failures_of(
    state: State,
    *,
    items: Iterable[Group | Invalid] | None,
    bodies: Mapping[str, bytes] | None = None,
    audit: Audit | None = None,
) -> Iterator[Failure]:
    """Every line that is not done, in line order. With `items` (the manifest): every line,
    never-sent ones included, with the manifest's own canonical body. Without: what the
    ledger knows (its recorded bodies, from `bodies`); never-sent lines cannot be listed."""
    if items is not None:
        for item in items:
            status, reason = status_of(item, state.latest, audit)
            if status in DONE_STATUSES:
                continue
            if isinstance(item, Invalid):
                yield Failure(
                    line=item.line, name=item.name, status=status, reason=reason, body=None
                )
            else:
                yield Failure(
                    line=item.line, name=item.name, status=status, reason=reason, body=item.body
                )
        return
    bodies = bodies or {}
    found = [
        Failure(line=line, name=name, status="invalid", reason="invalid manifest line", body=None)
        for line, name in state.invalid_lines.items()
    ]
    for name, entry in state.latest.items():
        if entry.done or entry.outcome is Outcome.INVALID:
            continue
        status = _status_of_name(entry)
        reason = (
            "in doubt: sent, but no answer was recorded"
            if entry.outcome is None
            else _reason(name, entry, audit)
        )
        found.append(
            Failure(line=entry.line, name=name, status=status, reason=reason, body=bodies.get(name))
        )
    yield from sorted(found, key=lambda f: f.line)
