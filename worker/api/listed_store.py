"""Where a listing keeps the groups it saw: on disk, so memory stays flat as the account grows.

Why on disk. A listing of 10^6 groups held as Python objects peaked a sync at ~1 GB (314 MB
measured at 3·10^5); the API lists up to 10^6. `ListedStore` is a Mapping from Name to
Listed in a private SQLite file: one B-tree keyed by Name (a WITHOUT ROWID table), whose
page cache is bounded (CACHE_KIB), so a lookup reads a few pages and keeps none of them
resident beyond that cache. Why SQLite and not the ledger's hash table (ledger/table.py):
export and the plan's extras walk the account sorted by Name, which a B-tree gives for
nothing and a hash table would need an external sort for. A point lookup costs ~12 µs
(measured, 10^6 Names), against ~3 µs for the hash table; a pass over the manifest reads its
Names ahead a batch at a time instead (`read_ahead`: one query per BATCH Names), and two
listings are compared inside SQLite (`differing`), not by a lookup per Name.

Ordering: iteration is by Name in SQLite's BINARY collation, which compares UTF-8 bytes;
UTF-8 byte order is code-point order, so it is Python's `sorted` order too.

Each row also holds `listing`: the number of the listing that last showed the Name
(rounds.Convergence uses it for "shown since the last write"); a Listing leaves it 0.

The file: in a private temporary directory (0700, the file 0600), removed by `close`, by the
finalizer if nobody closed it, and never read by anyone else. A kill -9 leaves the directory
in the temp dir, like any process's scratch file.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, TypeVar

import orjson

from worker.api.listed import Interner, Listed, Tag

CACHE_KIB: Final = 4096  # SQLite's page cache per store: bounds what a lookup keeps resident
BATCH: Final = 1000  # rows per statement when a store is filled from another mapping
_PREFIX: Final = "worker-listing-"
_T = TypeVar("_T")
_Row = tuple[str, bytes, int]  # project, encoded tags, listing


def _encode_tags(tags: tuple[Tag, ...]) -> bytes:
    return orjson.dumps(tags) if tags else b""


def _decode(name: str, project: str, tags: bytes, share: Interner) -> Listed:
    """A row as a Listed; repeated projects and tag lists come back as one shared copy
    (a tag list is looked up by its bytes first: most groups share a few, and a dict
    lookup costs a fraction of decoding them again)."""
    if not tags:
        return Listed(name=name, project=share(project))
    decoded = share.known(tags)
    if decoded is None:
        decoded = share(tuple(share(tuple(t)) for t in orjson.loads(tags)))
        share.remember(tags, decoded)
    return Listed(name=name, project=share(project), tags=decoded)


class NameOrdered(Mapping[str, Listed]):
    """A Mapping whose iteration is in Name order (reconcile walks two sorted streams)."""

    def prefetch(self, names: Sequence[str]) -> None:
        """A hint: lookups of `names` follow (see `read_ahead`). Ignoring it is correct."""


def read_ahead(
    items: Iterable[_T],
    name_of: Callable[[_T], str | None],
    *accounts: Mapping[str, Listed],
    batch: int = BATCH,
) -> Iterator[_T]:
    """`items` as they come, BATCH at a time; before a batch is handed out, each account
    that keeps its groups on disk reads the batch's Names in one query. A pass over the
    manifest looks each line's Name up two or three times: one query a line cost ~12 us
    each (10^5 lines: seconds of a sync's tail), one query per BATCH a fraction of that.
    A pass that feeds sends takes smaller batches (`batch`): the read holds the event loop."""
    ordered = [a for a in accounts if isinstance(a, NameOrdered)]
    source = iter(items)
    while chunk := list(itertools.islice(source, batch)):
        if ordered:
            names = [n for n in map(name_of, chunk) if n is not None]
            for account in ordered:
                account.prefetch(names)
        yield from chunk


def in_name_order(account: Mapping[str, Listed]) -> Iterator[str]:
    """The Names of `account` in Name order: as they come when it says so, else sorted."""
    return iter(account) if isinstance(account, NameOrdered) else iter(sorted(account))


class ListedStore(NameOrdered):
    """Name -> Listed in a private SQLite file, iterated in Name order. Close it (or use it
    as a context manager); the finalizer removes the file of a store nobody closed."""

    def __init__(self, *, tmp_dir: str | None = None) -> None:
        self._dir: str | None = None
        self._db: sqlite3.Connection | None = None
        self._dir = tempfile.mkdtemp(prefix=_PREFIX, dir=tmp_dir)  # 0700
        path = os.path.join(self._dir, "listing.db")
        try:
            # The file is made 0600 before SQLite opens it: nobody else ever reads it.
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            # Scratch data: no journal, no fsync; a crash loses nothing anyone needs.
            for pragma in (
                "journal_mode=OFF",
                "synchronous=OFF",
                "temp_store=FILE",
                f"cache_size=-{CACHE_KIB}",
            ):
                self._db.execute(f"PRAGMA {pragma}")
            self._db.execute(
                "CREATE TABLE g (name TEXT PRIMARY KEY, project TEXT NOT NULL, "
                "tags BLOB NOT NULL, listing INTEGER NOT NULL) WITHOUT ROWID"
            )
        except BaseException:
            self.close()
            raise
        self._len = 0
        self._share = Interner()
        # The rows of the latest `prefetch` (None: not held), until the next one or a write.
        self._ahead: dict[str, _Row | None] = {}
        self.path = path

    def __repr__(self) -> str:
        return f"<ListedStore {'closed' if self._db is None else len(self)} groups>"

    def __enter__(self) -> ListedStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the listing's store is closed")
        return self._db

    # -- reading ---------------------------------------------------------------------

    def _row(self, name: str) -> _Row | None:
        ahead = self._ahead
        if name in ahead:
            return ahead[name]
        row: _Row | None = self._conn.execute(
            "SELECT project, tags, listing FROM g WHERE name = ?", (name,)
        ).fetchone()
        return row

    def prefetch(self, names: Sequence[str]) -> None:
        """Read the rows of `names` (a batch: BATCH or so) in one query per BATCH; lookups of
        them are answered from memory until the next prefetch or write."""
        ahead: dict[str, _Row | None] = dict.fromkeys(names)
        wanted = list(ahead)
        for start in range(0, len(wanted), BATCH):
            chunk = wanted[start : start + BATCH]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT name, project, tags, listing FROM g WHERE name IN ({marks})"
            for name, project, tags, listing in self._conn.execute(query, chunk):
                ahead[name] = (project, tags, listing)
        self._ahead = ahead

    def __getitem__(self, name: str) -> Listed:
        row = self._row(name)
        if row is None:
            raise KeyError(name)
        return _decode(name, row[0], row[1], self._share)

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._row(name) is not None

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[str]:
        for (name,) in self._conn.execute("SELECT name FROM g ORDER BY name"):
            yield name

    def values(self) -> Iterator[Listed]:  # type: ignore[override]
        """Every group, in Name order, one at a time."""
        for name, project, tags in self._conn.execute(
            "SELECT name, project, tags FROM g ORDER BY name"
        ):
            yield _decode(name, project, tags, self._share)

    def items(self) -> Iterator[tuple[str, Listed]]:  # type: ignore[override]
        for listed in self.values():
            yield listed.name, listed

    def present(self, names: Iterable[str]) -> set[str]:
        """Which of `names` (a page's worth) the store holds: one query, not one per Name."""
        wanted = list(dict.fromkeys(names))
        found: set[str] = set()
        for start in range(0, len(wanted), BATCH):
            chunk = wanted[start : start + BATCH]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT name FROM g WHERE name IN ({marks})"  # only ? marks in it
            found.update(name for (name,) in self._conn.execute(query, chunk))
        return found

    def listing_of(self, name: str) -> int | None:
        """The number of the listing that last showed `name` (see `put`), or None."""
        row = self._row(name)
        return None if row is None else int(row[2])

    # -- writing ---------------------------------------------------------------------

    def put(self, listed: Listed, listing: int = 0) -> None:
        """Hold `listed` (a Name held already is overwritten), shown by listing `listing`."""
        self.put_all((listed,), listing)

    def put_all(self, groups: Iterable[Listed], listing: int = 0) -> None:
        """Hold every group of `groups`, in one transaction per BATCH (a later sighting of a
        Name overwrites an earlier one)."""
        conn = self._conn
        batch: list[tuple[str, str, bytes, int]] = []
        for listed in groups:
            batch.append((listed.name, listed.project, _encode_tags(listed.tags), listing))
            if len(batch) >= BATCH:
                self._write(conn, batch)
                batch = []
        if batch:
            self._write(conn, batch)

    def _write(self, conn: sqlite3.Connection, batch: list[tuple[str, str, bytes, int]]) -> None:
        names = {row[0] for row in batch}
        new = len(names - self.present(names))
        self._ahead = {}
        with conn:
            conn.execute("BEGIN")
            conn.executemany("INSERT OR REPLACE INTO g VALUES (?, ?, ?, ?)", batch)
        self._len += new

    def absorb(self, other: Mapping[str, Listed], listing: int, *, replace: bool) -> None:
        """Take every group of `other` as shown by listing `listing`; with `replace`, drop
        every group `other` does not hold first. Another store is copied inside SQLite."""
        conn = self._conn
        self._ahead = {}
        if replace:
            conn.execute("DELETE FROM g")
            self._len = 0
        if not isinstance(other, ListedStore):
            self.put_all(other.values(), listing)
            return
        conn.execute("ATTACH DATABASE ? AS other", (other.path,))
        try:
            with conn:
                conn.execute("BEGIN")
                conn.execute(
                    "INSERT OR REPLACE INTO g SELECT name, project, tags, ? FROM other.g",
                    (listing,),
                )
        finally:
            conn.execute("DETACH DATABASE other")
        self._count()

    def _count(self) -> None:
        (self._len,) = self._conn.execute("SELECT count(*) FROM g").fetchone()

    def close(self) -> None:
        """Close and remove the file. Idempotent and quiet: it is scratch."""
        db, self._db = self._db, None
        where, self._dir = self._dir, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()
        if where is not None:
            shutil.rmtree(where, ignore_errors=True)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


@contextlib.contextmanager
def differing(a: Mapping[str, Listed], b: Mapping[str, Listed]) -> Iterator[Iterator[str]]:
    """The Names held by one of `a` and `b` only, or held by both with another project or
    other tags (a superset: the same tags in another order count too), in Name order.

    Two stores are compared inside SQLite, one join over both files: a sync's check after
    its writes compares two listings of 10^5 groups, where a lookup in each per manifest
    line cost seconds. Use the iterator inside the `with` only."""
    if not (isinstance(a, ListedStore) and isinstance(b, ListedStore)):
        yield iter(sorted(n for n in {*a, *b} if a.get(n) != b.get(n)))
        return
    conn = a._conn
    conn.execute("ATTACH DATABASE ? AS diff", (b.path,))
    try:
        cursor = conn.execute(
            "SELECT x.name FROM g x LEFT JOIN diff.g y ON x.name = y.name "
            "WHERE y.name IS NULL OR x.project != y.project OR x.tags != y.tags "
            "UNION SELECT y.name FROM diff.g y WHERE y.name NOT IN (SELECT name FROM g) "
            "ORDER BY 1"
        )
        try:
            yield (name for (name,) in cursor)
        finally:
            cursor.close()
    finally:
        conn.execute("DETACH DATABASE diff")


class NameSet:
    """A set of Names on disk, iterated in Name order: the manifest's Names, against which
    the plan walks the account for extras (10^6 Names as a Python set cost ~90 MB).
    `add` buffers; reads see every Name added."""

    def __init__(self, *, tmp_dir: str | None = None) -> None:
        self._store = ListedStore(tmp_dir=tmp_dir)
        self._buffer: list[tuple[str]] = []

    def __enter__(self) -> NameSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, name: str) -> None:
        self._buffer.append((name,))
        if len(self._buffer) >= BATCH:
            self._flush()

    def update(self, names: Iterable[str]) -> None:
        for name in names:
            self.add(name)

    def _flush(self) -> None:
        if not self._buffer:
            return  # a read after the last add: nothing to write (a transaction is not free)
        conn = self._store._conn
        with conn:
            conn.execute("BEGIN")
            conn.executemany("INSERT OR IGNORE INTO g VALUES (?, '', x'', 0)", self._buffer)
        self._buffer = []

    def __contains__(self, name: object) -> bool:
        self._flush()
        return name in self._store

    def __iter__(self) -> Iterator[str]:
        self._flush()
        return iter(self._store)

    def close(self) -> None:
        self._buffer = []
        self._store.close()


def not_in(account: Mapping[str, Listed], names: NameSet) -> Iterator[Listed]:
    """The groups of `account` whose Name `names` does not hold, in Name order: a merge of
    two sorted streams, no lookup per Name."""
    given = iter(names)
    held = next(given, None)
    for name in in_name_order(account):
        while held is not None and held < name:
            held = next(given, None)
        if held != name:
            yield account[name]
