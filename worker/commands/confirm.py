"""The question a sync that deletes or replaces asks a person at a terminal, and only there.

Asked only when stdin and stderr are both terminals: cron, CI and a pipe never see it (a
job must not hang on a question nobody reads). `--yes` (WORKER_YES) answers it; `sync
--plan PLAN` does not ask, like `terraform apply PLAN`: the plan was reviewed when made,
and the apply is refused if anything moved since. Only the word `yes` is a yes.

The line is read from the event loop (add_reader), not from a blocked thread, so a signal at
the prompt stops the run at once (nothing was sent yet).
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import IO, Final

MAX_ANSWER: Final = 1024  # bytes of the answer read; a longer one is not `yes` either


def at_terminal() -> bool:
    """A person may be there to answer: stdin and stderr are both terminals."""
    try:
        return sys.stdin.isatty() and sys.stderr.isatty()
    except (ValueError, OSError, AttributeError):  # closed or no stdin
        return False


async def ask_yes(question: str, err: IO[str]) -> bool:
    """Print `question`, read one line from stdin: True only for `yes`."""
    print(question, end="", file=err, flush=True)
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    answer: asyncio.Future[bytes] = loop.create_future()

    def readable() -> None:
        if not answer.done():
            try:
                answer.set_result(os.read(fd, MAX_ANSWER))
            except OSError:
                answer.set_result(b"")

    loop.add_reader(fd, readable)
    try:
        said = await answer
    finally:
        loop.remove_reader(fd)
    if not said.endswith(b"\n"):
        print(file=err)  # end of input (^D): the next message starts on its own line
    return said.strip() == b"yes"
