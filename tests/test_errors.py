"""errors.raise_first: a TaskGroup's failure comes out as our own error, whatever Python 3.11.x."""

from __future__ import annotations

import asyncio

import pytest

from worker.errors import LedgerWriteError, ListingFailed, WorkerError, raise_first


async def _group_of(*excs: BaseException) -> None:
    async def fail(exc: BaseException) -> None:
        raise exc

    try:
        async with asyncio.TaskGroup() as tg:
            for exc in excs:
                tg.create_task(fail(exc))
    except BaseExceptionGroup as group:
        raise_first(group, WorkerError)


def test_our_error_comes_out_as_itself_not_in_a_group() -> None:
    """The CLI maps a WorkerError to its exit code; a group would be an internal error (70)."""
    with pytest.raises(ListingFailed, match="page 3"):
        asyncio.run(_group_of(ListingFailed("page 3")))


def test_the_first_of_ours_wins_over_other_failures() -> None:
    """Beside a foreign failure, ours is raised (it says why the run stopped)."""
    with pytest.raises(LedgerWriteError):
        asyncio.run(_group_of(ValueError("x"), LedgerWriteError("disk full")))


def test_a_group_without_ours_is_raised_as_it_is() -> None:
    """A bug stays a bug: the group goes on to the CLI's internal-error path."""
    with pytest.raises(ExceptionGroup):
        asyncio.run(_group_of(ValueError("x")))
