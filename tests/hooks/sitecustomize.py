"""Test hooks for the worker processes the tests start (tests/conftest.py `cli_env` puts this
folder on PYTHONPATH, so Python imports this module at start-up).

The worker reads no test variable: its time and faults come from `worker.connect.HOOKS`.
When a test sets one of these variables, this replaces HOOKS in that process only:

  TESTHOOK_UNREACHABLE_S   the 30 s an endpoint may stay silent before the run gives up
  TESTHOOK_FRESH_S         the 60 s a listing may serve sync's deletes
  TESTHOOK_CLOCK_OFFSET_S  a host whose clock is off: X-Date and the ledger's times shifted
  TESTHOOK_TORN_WRITES_S   each ledger record written in two halves with this pause between,
                           so that a kill -9 can land inside a record, as a crash can
  TESTHOOK_PROGRESS_EVERY_S  the 5 s between two `run.progress` lines off a terminal
  TESTHOOK_AHEAD_MIN_LINES   the 100 000 lines from which a plan is looked ahead by a
                             helper process (plan/ahead.py)
  TESTHOOK_AHEAD_BLOCK       the 4 096 lines of a block the helper or the plan looks up
  TESTHOOK_PREMARK_MIN_LINES the 100 000 lines from which a run offers its manifest to the
                             index's rebuild, to mark the lines done (ledger/premark.py)
  TESTHOOK_PREMARK_PATIENCE_S  how long that rebuild waits for the run to offer (0 s)

Without any of them nothing is imported here (a plain worker starts as a user's does).
"""

from __future__ import annotations

import os

_NAMES = (
    "TESTHOOK_UNREACHABLE_S",
    "TESTHOOK_FRESH_S",
    "TESTHOOK_CLOCK_OFFSET_S",
    "TESTHOOK_TORN_WRITES_S",
    "TESTHOOK_PROGRESS_EVERY_S",
    "TESTHOOK_AHEAD_MIN_LINES",
    "TESTHOOK_AHEAD_BLOCK",
    "TESTHOOK_PREMARK_MIN_LINES",
    "TESTHOOK_PREMARK_PATIENCE_S",
)


def _install(values: dict[str, float]) -> None:
    import dataclasses
    import time
    from datetime import datetime, timedelta

    from worker import connect
    from worker.ledger.journal import Ledger
    from worker.runner.stamps import utcnow

    hooks = connect.HOOKS
    if "TESTHOOK_UNREACHABLE_S" in values:
        hooks = dataclasses.replace(hooks, unreachable_s=values["TESTHOOK_UNREACHABLE_S"])
    if "TESTHOOK_FRESH_S" in values:
        hooks = dataclasses.replace(hooks, fresh_s=values["TESTHOOK_FRESH_S"])
    if offset := values.get("TESTHOOK_CLOCK_OFFSET_S", 0.0):

        def shifted() -> datetime:
            return utcnow() + timedelta(seconds=offset)

        hooks = dataclasses.replace(hooks, wall=shifted)
    if pause := values.get("TESTHOOK_TORN_WRITES_S", 0.0):

        class TornLedger(Ledger):
            """Writes each record in two halves, `pause` apart."""

            def _write(self, view: memoryview) -> None:
                half = len(view) // 2
                super()._write(view[:half])
                time.sleep(pause)
                super()._write(view[half:])

        hooks = dataclasses.replace(hooks, ledger=TornLedger)
    connect.HOOKS = hooks
    if "TESTHOOK_PROGRESS_EVERY_S" in values:
        from worker import progress

        progress.LINE_EVERY_S = values["TESTHOOK_PROGRESS_EVERY_S"]
    if "TESTHOOK_AHEAD_MIN_LINES" in values:
        from worker.plan import ahead

        ahead.MIN_LINES = int(values["TESTHOOK_AHEAD_MIN_LINES"])
    if "TESTHOOK_AHEAD_BLOCK" in values:
        from worker.plan import ahead

        ahead.BLOCK = int(values["TESTHOOK_AHEAD_BLOCK"])
    if "TESTHOOK_PREMARK_MIN_LINES" in values:
        from worker.ledger import premark

        premark.MIN_LINES = int(values["TESTHOOK_PREMARK_MIN_LINES"])
    if "TESTHOOK_PREMARK_PATIENCE_S" in values:
        from worker.ledger import premark

        premark.PATIENCE_S = values["TESTHOOK_PREMARK_PATIENCE_S"]


_values = {name: float(os.environ[name]) for name in _NAMES if os.environ.get(name)}
if _values:
    _install(_values)
