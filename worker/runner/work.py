"""One write item: what is sent, how its attempts went, and the records it leaves.

An item leaves an intent before each send and one result at the end; both are built here
from the item, so the dispatcher only decides when to write them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import orjson

from worker.api.classify import Answer
from worker.ledger.records import DONE, Action, Intent, Outcome, Result
from worker.runner.stamps import seconds_between


@dataclass(slots=True)
class Work:
    """One item to write: what to send, and how its attempts went so far."""

    action: Action
    name: str
    line: int
    fingerprint: str | None
    body: bytes  # the exact bytes signed and sent
    sends: int = 0
    attempts: int = 0  # failed sends that count against max_attempts (throttles do not)
    started: str = ""
    deadline: float = 0.0
    last: Answer | None = None


def intent_of(work: Work, *, run_id: str, at: str) -> Intent:
    """The record written before send number `work.sends`."""
    return Intent(
        run_id=run_id,
        action=work.action,
        name=work.name,
        line=work.line,
        fingerprint=work.fingerprint,
        attempt=work.sends,
        at=at,
        body=orjson.loads(work.body),
    )


def result_of(
    work: Work, outcome: Outcome, answer: Answer | None, *, run_id: str, finished: str
) -> Result:
    """The item's last record; no answer means it stopped before one came."""
    return Result(
        run_id=run_id,
        action=work.action,
        name=work.name,
        outcome=outcome,
        status=answer.status if answer else None,
        code=answer.code if answer else "Interrupted",
        message=answer.message if answer else "stopped before an answer",
        request_id=answer.request_id if answer else "",
        sends=work.sends,
        fingerprint=work.fingerprint,
        line=work.line,
        started=work.started,
        finished=finished,
        # For items not done: `report --failed` rebuilds the line from it.
        body=None if outcome in DONE else orjson.loads(work.body),
    )


def log_result(logger: Any, result: Result) -> None:
    """One `group.<outcome>` event per recorded result: info when done, else a warning."""
    done = result.outcome in DONE
    if not logger.is_enabled_for(logging.INFO if done else logging.WARNING):
        return  # -q: build no event nobody will see
    event = logger.info if done else logger.warning
    extra = (
        {"code": result.code, "message": result.message}
        if result.outcome not in (Outcome.CREATED, Outcome.UPDATED, Outcome.DELETED) and result.code
        else {}
    )
    event(
        f"group.{result.outcome}",
        action=str(result.action or "none"),
        name=result.name,
        line=result.line,
        sends=result.sends,
        status=result.status,
        request_id=result.request_id or None,
        duration_s=seconds_between(result.started, result.finished),
        **extra,
    )
