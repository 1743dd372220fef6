"""The sandbox's Live service: the account's groups and the four actions on them.

Behind the gateway, so every request here is authenticated and admitted. Where the API is
silent the choices are those of docs/api.md (*Where the API is silent*): tags replaced whole
by Update; Create of a deleted Name makes it available again with the new project and tags;
pages in creation order unless told otherwise (`list_order`: newest first, or a new random
order on every call). List may look at the past (`list_lag_s`: eventual consistency) and the
account may change while it is paged: a group after each of the first pages (`list_churn`),
or another party creating a group every S seconds and deleting its oldest S/2 later
(`churn_every_s`, applied lazily as requests arrive), so that a client is tested against
all of these.
"""

from __future__ import annotations

import math
import random
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from worker.api import spec
from worker.sandbox.envelope import ApiError
from worker.sandbox.store import Stored

AVAILABLE: Final = 0
DELETED: Final = 1
PAGE_MAX: Final = 1000
_LONG_AGO: Final = -math.inf  # preloaded and restored groups: there before anyone looked


@dataclass(frozen=True, slots=True)
class _Version:
    """What the group looked like from `since` on; status None: it did not exist."""

    since: float
    project: str
    tags: list[dict[str, str]]
    status: int | None


@dataclass(slots=True, kw_only=True)
class _Group:
    name: str
    now: _Version
    # Earlier versions List may still show (only kept while list_lag_s > 0), oldest first.
    before: list[_Version] = field(default_factory=list)
    created: int = 0  # creates carried out (a second one means a re-create after a delete)
    updated: int = 0
    deleted: int = 0
    exist_answers: int = 0
    requests: int = 0


class Service:
    def __init__(
        self,
        *,
        clock: Callable[[], float],
        forbid: str | None = None,
        list_lag_s: float = 0.0,
        list_churn: int = 0,
        list_order: str = "created",
        churn_every_s: float = 0.0,
        seed: int = 0,
    ) -> None:
        self._clock = clock
        self._order = list_order
        self._shuffle = random.Random(seed)
        self._every = churn_every_s
        self._churn_next = clock() + churn_every_s  # when the next churn create is due
        # The other party's groups not yet deleted, oldest first, with when each goes.
        self._churn_live: deque[tuple[str, float]] = deque()
        self._forbid = re.compile(forbid) if forbid else None
        self._lag = list_lag_s
        self._churn_left = list_churn
        self._churn_seq = 0
        # Insertion order is creation order: pages are stable unless the account changes.
        self._groups: dict[str, _Group] = {}
        self._views: dict[tuple[frozenset[int], str], list[tuple[str, _Version]]] = {}

    def carry_out(self, action: str, body: bytes) -> dict[str, Any] | None:
        """Do `action` with this body; its `Result`, or None for actions without one.
        Raises ApiError, in which case nothing has changed."""
        payload = decode(body)
        if self._every > 0:
            self._other_party(self._clock())
        if action == spec.CREATE:
            self._create(payload)
            return None
        if action == spec.LIST:
            result = self._list(payload)
            self._churn()
            return result
        if action == spec.UPDATE:
            self._update(payload)
            return None
        if action == spec.DELETE:
            self._delete(payload)
            return None
        raise ApiError(404, "InvalidActionOrVersion", "the action or version is not supported")

    # -- the account, for loading, saving and /_sandbox/state -------------------------------

    def load(self, groups: Iterable[Stored]) -> None:
        """Put groups into the account as they have always been there (List sees them at
        once, whatever the lag). A Name already present is replaced."""
        self._views.clear()
        for g in groups:
            self._groups[g.name] = _Group(
                name=g.name,
                now=_Version(_LONG_AGO, g.project, list(g.tags), g.status),
                created=g.created,
                updated=g.updated,
                deleted=g.deleted,
                exist_answers=g.exist_answers,
                requests=g.requests,
            )

    def stored(self) -> list[Stored]:
        return [
            Stored(
                name=g.name,
                project=g.now.project,
                tags=g.now.tags,
                status=g.now.status if g.now.status is not None else DELETED,
                created=g.created,
                updated=g.updated,
                deleted=g.deleted,
                exist_answers=g.exist_answers,
                requests=g.requests,
            )
            for g in self._groups.values()
            if g.now.status is not None
        ]

    def state(self) -> list[dict[str, Any]]:
        """Every group as it is now (no lag), with the counters tests judge the worker by."""
        return [
            {
                "Name": g.name,
                "ProjectName": g.project,
                "Tags": g.tags,
                "Status": g.status,
                "created": g.created,
                "updated": g.updated,
                "deleted": g.deleted,
                "exist_answers": g.exist_answers,
                "requests": g.requests,
            }
            for g in self.stored()
        ]

    # -- actions ----------------------------------------------------------------------------

    def _create(self, payload: dict[str, Any]) -> None:
        name = check_name(payload.get("Name"))
        project = payload.get("ProjectName", spec.DEFAULT_PROJECT)
        if not isinstance(project, str):
            raise ApiError(400, "InvalidParam.BindError", "ProjectName must be a string")
        project = project or spec.DEFAULT_PROJECT
        tags = check_tags(payload.get("Tags", []))
        self._refuse_forbidden(name, project)
        group = self._groups.get(name)
        if group is not None and group.now.status == AVAILABLE:
            group.requests += 1
            group.exist_answers += 1
            raise ApiError(
                429,
                "RequestLimitExceeded.Exist",
                "the resource requested to be created already exists, please rename it",
            )
        if group is None:
            group = self._groups[name] = _Group(
                name=name, now=_Version(_LONG_AGO, project, [], None)
            )
        # A deleted Name is created again (API silent; our choice): new project and tags.
        self._change(group, project=project, tags=tags, status=AVAILABLE)
        group.created += 1
        group.requests += 1

    def _update(self, payload: dict[str, Any]) -> None:
        name = check_name(payload.get("Name"))
        if "Tags" not in payload:  # strict (API silent): a client that forgets them would clear
            raise ApiError(400, "InvalidParam", "Tags is required")
        tags = check_tags(payload["Tags"])
        group = self._available(name)
        self._change(group, project=group.now.project, tags=tags, status=AVAILABLE)
        group.updated += 1

    def _delete(self, payload: dict[str, Any]) -> None:
        group = self._available(check_name(payload.get("Name")))
        self._change(group, project=group.now.project, tags=group.now.tags, status=DELETED)
        group.deleted += 1

    def _list(self, payload: dict[str, Any]) -> dict[str, Any]:
        page, size = _page_param(payload, "PageNum"), _page_param(payload, "PageSize")
        statuses = payload.get("StatusList", [AVAILABLE])
        if not isinstance(statuses, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in statuses
        ):
            raise ApiError(400, "InvalidParam.BindError", "StatusList must be a list of integers")
        if not statuses or not set(statuses) <= {AVAILABLE, DELETED}:
            raise ApiError(400, "InvalidParam", "StatusList must hold 0 (available) and/or 1")
        shown = self._view(frozenset(statuses))
        if self._order == "shuffled":
            shown = self._shuffle.sample(shown, len(shown))
        items = [
            {
                "Name": name,
                "ProjectName": v.project,
                "Status": v.status,
                "Tags": [dict(t) for t in v.tags],
            }
            for name, v in shown[(page - 1) * size : page * size]
        ]
        return {"List": items, "Total": len(shown)}

    def _view(self, wanted: frozenset[int]) -> list[tuple[str, _Version]]:
        """The groups List selects, in creation order (newest first with that order). Without
        lag the view only changes on a write, so it is kept until the next one: paging
        100 000 groups stays linear."""
        key = (wanted, self._order)
        if self._lag == 0 and (cached := self._views.get(key)) is not None:
            return cached
        horizon = self._clock() - self._lag
        shown = [
            (g.name, v) for g in self._groups.values() if (v := _as_of(g, horizon)).status in wanted
        ]
        if self._order == "newest":
            shown.reverse()
        if self._lag == 0:
            self._views[key] = shown
        return shown

    # -- helpers ----------------------------------------------------------------------------

    def _available(self, name: str) -> _Group:
        """The available group called `name`; 403 if forbidden, 404 if absent or deleted."""
        group = self._groups.get(name)
        self._refuse_forbidden(name, group.now.project if group is not None else None)
        if group is not None:
            group.requests += 1
        if group is None or group.now.status != AVAILABLE:
            raise ApiError(404, "ResourceNotFound", f"group {name} does not exist")
        return group

    def _change(
        self,
        group: _Group,
        *,
        project: str,
        tags: list[dict[str, str]],
        status: int,
        at: float | None = None,
    ) -> None:
        self._views.clear()
        now = self._clock() if at is None else at
        if self._lag > 0:
            group.before.append(group.now)
            # Keep only what List can still see: the newest version older than the horizon.
            horizon = now - self._lag
            while len(group.before) > 1 and group.before[1].since <= horizon:
                del group.before[0]
        group.now = _Version(now, project, tags, status)

    def _churn(self) -> None:
        """Someone else adds a group right after a page was answered (--list-churn)."""
        if self._churn_left <= 0:
            return
        self._churn_left -= 1
        name = self._new_churn_name()
        self._groups[name] = _Group(name=name, now=_Version(_LONG_AGO, "", [], None))
        self._change(self._groups[name], project=spec.DEFAULT_PROJECT, tags=[], status=AVAILABLE)

    def _other_party(self, now: float) -> None:
        """Another party's writes due by `now` (--churn-every S): a create every S seconds,
        and S/2 after each, the delete of the oldest group it made."""
        while True:
            create_at = self._churn_next
            delete_at = self._churn_live[0][1] if self._churn_live else math.inf
            at = min(create_at, delete_at)
            if at > now:
                return
            if delete_at <= create_at:
                gone = self._groups[self._churn_live.popleft()[0]]
                self._change(
                    gone, project=gone.now.project, tags=gone.now.tags, status=DELETED, at=at
                )
                continue
            name = self._new_churn_name()
            group = self._groups[name] = _Group(name=name, now=_Version(_LONG_AGO, "", [], None))
            self._change(group, project="otherteam", tags=[], status=AVAILABLE, at=at)
            self._churn_live.append((name, at + self._every / 2))
            self._churn_next = at + self._every

    def _new_churn_name(self) -> str:
        while True:
            self._churn_seq += 1
            name = f"Churn{self._churn_seq:04d}"
            if name not in self._groups:
                return name

    def _refuse_forbidden(self, name: str, project: str | None) -> None:
        if self._forbid is not None and (
            self._forbid.search(name) or (project and self._forbid.search(project))
        ):
            raise ApiError(403, "RequestForbidden", "the account has no such resource")


def _as_of(group: _Group, horizon: float) -> _Version:
    """The version List shows when it sees the account as it was at `horizon`."""
    if group.now.since <= horizon:
        return group.now
    for version in reversed(group.before):
        if version.since <= horizon:
            return version
    return _Version(_LONG_AGO, "", [], None)  # created after the horizon: not there yet


def _page_param(payload: dict[str, Any], key: str) -> int:
    value = payload.get(key)
    if value is None:  # strict (API silent on defaults): a client must say what it wants
        raise ApiError(400, "InvalidParam", f"{key} is required")
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(400, "InvalidParam.BindError", f"{key} must be an integer")
    if not 1 <= value <= PAGE_MAX:
        raise ApiError(400, "InvalidParam", f"{key} must lie in 1-{PAGE_MAX}")
    return value


def decode(body: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        raise ApiError(
            400, "InvalidParam.BindError", "Request parameter error, please check input data"
        ) from None
    if not isinstance(payload, dict):
        raise ApiError(400, "InvalidParam.BindError", "the body must be a JSON object")
    return payload


def check_name(name: object) -> str:
    if name is None:
        raise ApiError(400, "InvalidParam", "Name is required")
    if not isinstance(name, str):
        raise ApiError(400, "InvalidParam.BindError", "Name must be a string")
    if (problem := spec.name_problem(name)) is not None:
        raise ApiError(400, "InvalidParam", f"Name {problem}")
    return name


def check_tags(tags: object) -> list[dict[str, str]]:
    if not isinstance(tags, list) or not all(
        isinstance(t, dict) and all(isinstance(t.get(k, ""), str) for k in spec.TAG_FIELDS)
        for t in tags
    ):
        raise ApiError(400, "InvalidParam.BindError", "Tags must be a list of string objects")
    for field_name, reason in spec.tags_problems(tags):
        if not reason.startswith("unknown field"):  # the real binding ignores extra fields
            raise ApiError(400, "InvalidParam", f"{field_name} {reason}")
    return [{"Key": t["Key"], "Value": t["Value"], "Category": t["Category"]} for t in tags]
