"""Ledger records: the typed values the runner writes and `report` reads, defined once.

One JSON object per ledger line, `type` first. orjson serializes these dataclasses as they
are (enums as their values); `schema.parse` turns a decoded line back into one of them,
checking every field's type, so a hand-edited record is an error naming its line, never a
crash.

    run     RunHeader  the target, the manifest and its sha256, the plan, the settings
    intent  Intent     written before each request is sent (the body is on disk first)
    result  Result     one per finished item, with its action and outcome
    end     Footer     how the run ended, its counts, its pacing

`Item` and `Latest` are what the ledger's state keeps of the intents and results: the
first as read from one line, the second as the latest word per Name.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple


class Action(enum.StrEnum):
    """The write an item needs. (List requests are reads: they have no item and no record.)"""

    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"


class Outcome(enum.StrEnum):
    CREATED = "created"  # create answered OK
    EXISTS = "exists"  # create answered "already exists": it is there
    UPDATED = "updated"  # update answered OK: the tags are the manifest's
    DELETED = "deleted"  # delete answered OK, or ResourceNotFound (already gone)
    VANISHED = "vanished"  # update answered ResourceNotFound: the next sync creates it
    CONFLICT = "conflict"  # the account's ProjectName differs; nothing sent
    REJECTED = "rejected"  # the server refused this item (the line must change)
    DEFERRED = "deferred"  # out of attempts or time, or stopped while waiting: run again
    INVALID = "invalid"  # the manifest line is invalid (--skip-invalid)


DONE: Final = frozenset({Outcome.CREATED, Outcome.EXISTS, Outcome.UPDATED, Outcome.DELETED})
# Outcomes that leave the account different from the manifest and need a human.
NEEDS_FIX: Final = frozenset({Outcome.REJECTED, Outcome.INVALID, Outcome.CONFLICT})


class StopReason(enum.StrEnum):
    """Why a run ended early (Footer.stopped_by); None in the footer means it finished."""

    SIGNAL = "signal"  # SIGINT/SIGTERM
    LIMITER = "limiter"  # the shared limiter stayed unreachable
    UNREACHABLE = "unreachable"  # the endpoint gave no HTTP answer at all
    ABORTED = "aborted"  # the server refused the run (auth, permission, clock, redirect)
    LEDGER = "ledger"  # a ledger write failed
    LISTING = "listing"  # sync: the account could not be listed completely
    ERROR = "error"  # an internal error


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """Whose account a ledger is the journal of. A ledger serves exactly one target."""

    endpoint: str  # scheme://host[:port], redacted; "sandbox:<state file>" for --sandbox
    region: str
    access_key: str

    def __str__(self) -> str:
        return f"{self.endpoint} (region {self.region}, access key {self.access_key})"


@dataclass(frozen=True, slots=True, kw_only=True)
class RunHeader:
    type: Literal["run"] = "run"
    run_id: str
    started: str  # ISO 8601 UTC, milliseconds
    version: str
    command: Literal["run", "sync"]
    target: Target
    manifest: str
    manifest_sha256: str
    items: int  # non-blank manifest lines, valid or not
    plan: dict[str, int]  # counts per plan reason
    settings: dict[str, Any]  # Settings.public(): no secrets, URLs redacted


@dataclass(frozen=True, slots=True, kw_only=True)
class Intent:
    type: Literal["intent"] = "intent"
    run_id: str
    action: Action
    name: str
    line: int  # manifest line; 0 for a delete (the Name is not in the manifest)
    fingerprint: str | None  # sha256 of the manifest line's canonical body; None for deletes
    attempt: int  # 1 for the first send of this item in this run
    at: str
    body: dict[str, Any]  # exactly what is sent


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    type: Literal["result"] = "result"
    run_id: str
    action: Action | None  # None for invalid lines and conflicts (nothing sent)
    name: str | None  # None for an invalid line without a usable Name
    outcome: Outcome
    status: int | None  # HTTP status of the last answer; None when there was none
    code: str  # the last answer's error code; "" for success
    message: str  # sanitised and bounded server text, or our own reason
    request_id: str
    sends: int  # requests sent for this item in this run
    fingerprint: str | None
    line: int
    started: str
    finished: str
    body: dict[str, Any] | None = None  # for items not done: `report --failed` rebuilds them


@dataclass(frozen=True, slots=True, kw_only=True)
class Footer:
    type: Literal["end"] = "end"
    run_id: str
    finished: str
    stopped_by: StopReason | None  # None: the run went through every item
    exit_code: int
    outcomes: dict[str, int]  # "action/outcome" -> count, e.g. "create/created"
    skipped: dict[str, int]  # plan reason -> count
    codes: dict[str, int]  # answer code ("OK" for success) -> count
    requests: int  # every request sent, Lists included
    throttles: int
    retries: int
    duration_s: float
    rate_limit: float  # --rate
    rate_achieved: float  # requests / duration


Record = RunHeader | Intent | Result | Footer


class Item(NamedTuple):
    """What the ledger state keeps of an intent (outcome None) or a result.

    A NamedTuple, not a frozen dataclass: a rebuild makes one per ledger record, and a
    frozen dataclass costs 1.06 us to make against 0.13 us (schema.item_of), measured."""

    name: str | None
    line: int
    fingerprint: str | None
    action: Action | None
    outcome: Outcome | None
    code: str

    @classmethod
    def of(cls, record: Intent | Result) -> Item:
        if isinstance(record, Intent):
            return cls(record.name, record.line, record.fingerprint, record.action, None, "")
        return cls(
            record.name,
            record.line,
            record.fingerprint,
            record.action,
            record.outcome,
            record.code,
        )


@dataclass(slots=True)
class Latest:
    """The ledger's latest word on one Name (what plan.decide and report read)."""

    outcome: Outcome | None  # None: an intent with no result after it (in doubt)
    action: Action | None
    fp: bytes | None  # sha256 digest of the body sent; None for deletes and nameless lines
    code: str  # the last answer's error code, "" for success or in doubt
    line: int

    @classmethod
    def of(cls, record: Intent | Result) -> Latest:
        item = Item.of(record)
        fp = bytes.fromhex(item.fingerprint) if item.fingerprint is not None else None
        return cls(outcome=item.outcome, action=item.action, fp=fp, code=item.code, line=item.line)

    @property
    def in_doubt(self) -> bool:
        """Sent, and no answer recorded: the next run sends it again."""
        return self.outcome is None

    @property
    def done(self) -> bool:
        return self.outcome in DONE

    @property
    def fingerprint(self) -> str | None:
        return self.fp.hex() if self.fp is not None else None
