"""Retry step: what to do with an item after one verdict. Pure, and tested as a table.

    (verdict, action, attempts, policy, rng, now, deadline) -> Finish | Wait | Stop

`classify` says what an answer means; this says what the run does about it for one item:
finish it with an outcome, wait and send it again, or stop the whole run. Time and the random
source come in as arguments, so the table tests need no clock and no sleeps.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import assert_never

from worker.classify import (
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


Step = Finish | Wait | Stop


def next_step(
    verdict: Verdict,
    *,
    action: Action,
    attempts: int,
    policy: RetryPolicy,
    rng: random.Random,
    now: float,
    deadline: float,
) -> Step:
    """`attempts` counts the failed sends before this one (throttles excluded)."""
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
            assert_never(verdict)


def _wait(delay: float, answer: Answer, now: float, deadline: float, *, counts: bool) -> Step:
    if not math.isfinite(delay) or now + delay > deadline:
        return Finish(Outcome.DEFERRED, answer)
    return Wait(delay, answer, counts)
