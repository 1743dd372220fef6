"""`worker report`: what a ledger says about its runs and about each line of the last run's
manifest: the summary (text, or one JSON object), or the lines not done (`--failed`). The
reading is worker/report/; this says only what is printed where."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import orjson

from worker.errors import Exit
from worker.report.gather import Gathered, gather, recorded_bodies
from worker.report.render import render
from worker.report.status import Failure, failures_of, summary_of


def main(
    ledger: Path,
    *,
    manifest: Path | None = None,
    json: bool = False,
    failed: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """`worker report`: the summary (text, or one JSON object with `json`); or with `failed`
    the lines not done: as a manifest on `out` with each reason on `err`, or with `json` one
    JSON object per line (line, name, status, reason, body) on `out`. `out` and `err` default
    to stdout and stderr. Returns the exit code (0); a ledger it cannot read raises."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    with gather(ledger, manifest=manifest) as got:
        if failed:
            _print_failures(got, ledger, json=json, out=out, err=err)
        else:
            _print_summary(got, ledger, json=json, out=out)
    return Exit.OK


def _print_summary(got: Gathered, ledger: Path, *, json: bool, out: TextIO) -> None:
    summary = summary_of(
        got.state, items=got.items(), locked=got.locked, note=got.note, audit=got.audit
    )
    summary["ledger"] = str(ledger)
    out.write(orjson.dumps(summary).decode() + "\n" if json else render(summary) + "\n")


def _print_failures(got: Gathered, ledger: Path, *, json: bool, out: TextIO, err: TextIO) -> None:
    """Each line not done: a JSON row (`json`), or its body on `out` and its reason on `err`."""
    items = got.items()
    bodies = None
    if items is None:
        print(f"note: {got.note}; lines never sent cannot be listed", file=err)
        wanted = {n for n, e in got.state.latest.items() if not e.done}
        bodies = recorded_bodies(ledger, wanted)
    where = str(got.scan.path) if got.scan is not None else "(ledger)"
    listed = unlisted = 0
    for failure in failures_of(got.state, items=items, bodies=bodies, audit=got.audit):
        if json:
            out.write(orjson.dumps(_row(failure)).decode() + "\n")
            continue
        print(f"{where}:{failure.line}: {failure.name or '-'}: {failure.reason}", file=err)
        if failure.body is None:
            unlisted += 1
            continue
        out.write(failure.body.decode() + "\n")
        listed += 1
    if not json:
        print(
            f"{listed} line(s) not done printed as a manifest"
            + (
                f"; {unlisted} not printed (invalid, or no body recorded): fix them in the manifest"
                if unlisted
                else ""
            ),
            file=err,
        )
    out.flush()


def _row(failure: Failure) -> dict[str, object]:
    body = orjson.Fragment(failure.body) if failure.body is not None else None
    return {
        "line": failure.line,
        "name": failure.name,
        "status": failure.status,
        "reason": failure.reason,
        "body": body,
    }
