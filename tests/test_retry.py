"""What the runner does after one verdict: retry.next_step as a table (no clock, no sleeps)."""

from __future__ import annotations

import math
import random

import pytest

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
)
from worker.ledger.records import Action, Outcome
from worker.runner.retry import Answered, Finish, Stop, Wait, next_step
from worker.settings import RetryPolicy

A = Answer(200, "", "", "rid")
E = Answer(500, "InternalError", "boom", "rid")
POLICY = RetryPolicy(max_attempts=3, initial_s=1.0, max_delay_s=8.0, item_deadline_s=100.0)

C, U, D = Action.CREATE, Action.UPDATE, Action.DELETE


def step(
    verdict: Verdict,
    action: Action | None = C,
    attempts: int = 0,
    now: float = 0.0,
    deadline: float = 100.0,
) -> object:
    return next_step(
        verdict,
        action=action,
        attempts=attempts,
        policy=POLICY,
        rng=random.Random(0),
        now=now,
        deadline=deadline,
    )


@pytest.mark.parametrize(
    ("verdict", "action", "outcome"),
    [
        (Succeeded(A), C, Outcome.CREATED),
        (Succeeded(A), U, Outcome.UPDATED),
        (Succeeded(A), D, Outcome.DELETED),
        (Exists(A), C, Outcome.EXISTS),
        (Exists(A), U, Outcome.REJECTED),
        (Exists(A), D, Outcome.REJECTED),
        (NotFound(A), C, Outcome.REJECTED),
        (NotFound(A), U, Outcome.VANISHED),
        (NotFound(A), D, Outcome.DELETED),
        (Rejected(A), C, Outcome.REJECTED),
        (Rejected(A), U, Outcome.REJECTED),
        (Rejected(A), D, Outcome.REJECTED),
    ],
)
def test_final_answers_finish_with_the_outcome_of_their_action(
    verdict: Verdict, action: Action, outcome: Outcome
) -> None:
    """Each final verdict maps to one outcome per action: ResourceNotFound is done for a
    delete, a vanished group for an update, a refusal for a create."""
    assert step(verdict, action) == Finish(outcome, A)


def test_abort_stops_the_run() -> None:
    """An Abort (credentials, permission, redirect) stops the run with its hint."""
    assert step(Abort(E, "fix the keys")) == Stop(E, "fix the keys")


def test_retry_waits_a_backoff_that_counts_an_attempt() -> None:
    """A retryable answer waits a jittered backoff within the policy and uses an attempt."""
    result = step(Retry(E, None), attempts=1)
    assert isinstance(result, Wait) and result.counts
    assert 0 <= result.delay_s <= 2.0  # 1 s x 2^(2-1), full jitter


def test_retry_after_is_a_floor_for_the_backoff() -> None:
    """A server's Retry-After (already clamped by classify) is never waited less."""
    result = step(Retry(E, 5.0))
    assert isinstance(result, Wait) and result.delay_s == 5.0


def test_out_of_attempts_is_deferred() -> None:
    """The max_attempts-th failed send finishes the item as deferred, not another wait."""
    assert step(Retry(E, None), attempts=2) == Finish(Outcome.DEFERRED, E)


def test_a_wait_past_the_item_deadline_is_deferred() -> None:
    """A wait that would end after the item's deadline defers the item now."""
    assert step(Retry(E, 5.0), now=96.0) == Finish(Outcome.DEFERRED, E)
    assert step(Throttled(E, 5.0), now=96.0) == Finish(Outcome.DEFERRED, E)


def test_a_throttle_waits_without_using_an_attempt() -> None:
    """FlowLimitExceeded waits (its Retry-After or not at all) and uses no attempt, even
    when the attempts are used up: being slowed down is not a failure of the item."""
    assert step(Throttled(E, None), attempts=2) == Wait(0.0, E, False)
    assert step(Throttled(E, 3.0)) == Wait(3.0, E, False)


def test_a_non_finite_delay_defers_instead_of_waiting_forever() -> None:
    """An infinite or NaN delay (from anywhere) defers the item rather than sleeping."""
    assert step(Throttled(E, float("inf"))) == Finish(Outcome.DEFERRED, E)
    assert step(Throttled(E, float("nan"))) == Finish(Outcome.DEFERRED, E)


def test_a_read_ends_answered_with_its_result() -> None:
    """A List answered OK with a Result object: Answered, carrying that object."""
    page = {"List": [], "Total": 0}
    assert step(Succeeded(A, page), None) == Answered(A, page)


@pytest.mark.parametrize("verdict", [Succeeded(A), Exists(A), NotFound(A), Rejected(A)])
def test_any_other_final_answer_to_a_read_is_a_refusal(verdict: Verdict) -> None:
    """An OK without a Result, 'exists', 'not found', a refusal: no retry changes them, so a
    read finishes REJECTED (the runner stops with RunAborted), never waits."""
    assert step(verdict, None) == Finish(Outcome.REJECTED, A)


@pytest.mark.parametrize(
    ("verdict", "attempts", "now"),
    [
        (Retry(E, None), 0, 0.0),
        (Retry(E, None), 2, 0.0),  # out of attempts
        (Retry(E, 50.0), 0, 60.0),  # past the deadline
        (Throttled(E, 3.0), 9, 0.0),
        (Throttled(E, math.inf), 0, 0.0),
        (Abort(E, "fix the keys"), 0, 0.0),
    ],
)
def test_reads_retry_and_stop_exactly_as_writes_do(
    verdict: Verdict, attempts: int, now: float
) -> None:
    """One retry policy: for retries, throttles and aborts a read's step equals a create's."""
    assert step(verdict, None, attempts, now) == step(verdict, C, attempts, now)
