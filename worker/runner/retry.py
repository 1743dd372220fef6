"""Retry step: what to do with a request after one verdict. Pure, and tested as a table.

    (verdict, action, attempts, policy, rng, now, deadline) -> Finish | Wait | Stop
                                                   (a read: | Answered)

`classify` says what an answer means; this says what the run does about it: finish an item
with an outcome, wait and send it again, or stop the whole run. Writes and reads (List, which
has no item and no record: `action` None) share one retry policy, this one. Time and the
random source come in as arguments, so the table tests need no clock and no sleeps.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, assert_never, overload

from worker.api.classify import (
    Abort,
    Answer,
    Exists,
    NotFound,
    Rejected,
    Retry,
    Succeeded,
    Throttled,
    Verdict,
    backoff_s,
)
from worker.ledger.records import Action, Outcome
from worker.settings import RetryPolicy

_SUCCESS = {
    Action.CREATE: Outcome.CREATED,
    Action.UPDATE: Outcome.UPDATED,
    Action.DELETE: Outcome.DELETED,
}
# ResourceNotFound: a delete finds the group already gone (done); an update finds it vanished
# (the next sync creates it); a create cannot get it for a reason of its own.
_NOT_FOUND = {
    Action.CREATE: Outcome.REJECTED,
    Action.UPDATE: Outcome.VANISHED,
    Action.DELETE: Outcome.DELETED,
}


@dataclass(frozen=True, slots=True)
class Finish:
    outcome: Outcome
    answer: Answer


@dataclass(frozen=True, slots=True)
class Wait:
    """Send again after `delay_s`. `counts` is False for a throttle: it uses up no attempt."""

    delay_s: float
    answer: Answer
    counts: bool


@dataclass(frozen=True, slots=True)
class Stop:
    """Every further request would fail the same way: stop the run."""

    answer: Answer
    hint: str


@dataclass(frozen=True, slots=True)
class Answered:
    """A read got what it asked for: the answer's `Result` object."""

    answer: Answer
    result: dict[str, Any]


Step = Finish | Wait | Stop
ReadStep = Answered | Finish | Wait | Stop


@overload
def next_step(
    verdict: Verdict,
    *,
    action: Action,
    attempts: int,
    policy: RetryPolicy,
    rng: random.Random,
    now: float,
    deadline: float,
) -> Step: ...
@overload
def next_step(
    verdict: Verdict,
    *,
    action: None,
    attempts: int,
    policy: RetryPolicy,
    rng: random.Random,
    now: float,
    deadline: float,
) -> ReadStep: ...
def next_step(
    verdict: Verdict,
    *,
    action: Action | None,
    attempts: int,
    policy: RetryPolicy,
    rng: random.Random,
    now: float,
    deadline: float,
) -> ReadStep:
    """`attempts` counts the failed sends before this one (throttles excluded). `action`
    None is a read: it ends Answered, or Finish(DEFERRED) when out of attempts or time, or
    Finish(REJECTED) for any other answer (no retry changes a refused List)."""
    match verdict:
        case Abort():
            return Stop(verdict.answer, verdict.hint)
        case Throttled():
            return _wait(verdict.retry_after_s or 0.0, verdict.answer, now, deadline, counts=False)
        case Retry():
            if attempts + 1 >= policy.max_attempts:
                return Finish(Outcome.DEFERRED, verdict.answer)
            delay = backoff_s(attempts + 1, policy, rng, verdict.retry_after_s)
            return _wait(delay, verdict.answer, now, deadline, counts=True)
        case _:
            return _read(verdict) if action is None else _written(verdict, action)


def _written(verdict: Succeeded | Exists | NotFound | Rejected, action: Action) -> Finish:
    match verdict:
        case Succeeded():
            return Finish(_SUCCESS[action], verdict.answer)
        case Exists():
            # "Already exists" confirms a create (ours, after an ambiguous failure, or someone
            # else's); for an update or a delete it is no answer we understand.
            outcome = Outcome.EXISTS if action is Action.CREATE else Outcome.REJECTED
            return Finish(outcome, verdict.answer)
        case NotFound():
            return Finish(_NOT_FOUND[action], verdict.answer)
        case Rejected():
            return Finish(Outcome.REJECTED, verdict.answer)
        case _:
            assert_never(verdict)


def _read(verdict: Succeeded | Exists | NotFound | Rejected) -> Answered | Finish:
    if isinstance(verdict, Succeeded) and verdict.result is not None:
        return Answered(verdict.answer, verdict.result)
    # InvalidParam, ResourceNotFound, an OK without a Result: a refusal no retry changes.
    return Finish(Outcome.REJECTED, verdict.answer)


def _wait(delay: float, answer: Answer, now: float, deadline: float, *, counts: bool) -> Step:
    if not math.isfinite(delay) or now + delay > deadline:
        return Finish(Outcome.DEFERRED, answer)
    return Wait(delay, answer, counts)
