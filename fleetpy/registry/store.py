"""The key-value store under the registry: one async vocabulary, several implementations.

Every store speaks the same small set of operations (get, list, put with TTL and
compare-and-set, refresh, delete, watch from an index), so the registry's logic is written once,
above them: etcd's v2 API (`etcd2.py`), etcd's v3 API (`etcd3.py`) and memory (`memory.py`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)


class StoreError(Exception):
    """A store operation failed in a way the caller can explain to a person."""


class Unavailable(StoreError):
    """etcd did not answer, even after retrying."""


class NoQuorum(Unavailable):
    """etcd members answer, but none has a leader: a majority of the cluster is gone, and etcd
    takes no reads or writes until enough members are back."""


class DataReplaced(Unavailable):
    """etcd answers, but not with the data this store followed: a member's index went back, or
    its cluster id changed (its data dir wiped or restored from an older copy, or another etcd
    at the same address). See DataLineage."""

    def __init__(self, url: str, why: str):
        super().__init__(
            f"etcd at {url} no longer holds the data this fleetd followed: {why}; its data dir was "
            "wiped or restored from an older copy, or another etcd answers there. fleetd acts on "
            "nothing it reads there, so every unit keeps running as it is: put etcd's data back, "
            "or restart fleetd to take etcd's data as it is now (units not scheduled there stop)"
        )


class DataLineage:
    """Whether etcd's answers still come from the data a store has followed.

    A member's index (v2) or revision (v3) never goes back while it keeps its data, and a
    cluster keeps its id. An answer below what the same member had answered before the request
    went out (a request sent earlier may come back later), or from another cluster, means the
    data was replaced: a wiped etcd lists no schedule at all, and an agent acting on that would
    stop every unit. From then on every request of the store fails with DataReplaced, an outage
    to every caller; a new store (fleetd restarted) takes etcd's data as it is. One per store,
    shared by its threads.
    """

    def __init__(self) -> None:
        self.replaced: DataReplaced | None = None
        self._highest: dict[object, int] = {}  # by member
        self._cluster: object = None
        self._lock = threading.Lock()

    def check_usable(self) -> None:
        if self.replaced is not None:
            raise self.replaced

    def floor(self, member: object) -> int:
        return self._highest.get(member, 0)

    def floors(self) -> dict[object, int]:
        return dict(self._highest)

    def seen(self, url: str, member: object, floor: int, index: int | None, cluster: object = None) -> None:
        """`member` (reached at `url`) answered at `index` (None: unknown), from `cluster` (None:
        unknown); `floor` is `floor(member)` from before the request went out."""
        with self._lock:
            if cluster is not None:
                if self._cluster is not None and cluster != self._cluster:
                    raise self.mismatch(url, f"its cluster id changed from {self._cluster} to {cluster}")
                self._cluster = cluster
            if index is None:
                return
            if index < floor:
                raise self.mismatch(url, f"its index went back from {floor} to {index}")
            self._highest[member] = max(self._highest.get(member, 0), index)

    def mismatch(self, url: str, why: str) -> DataReplaced:
        """The error every request fails with from now on (logged once)."""
        if self.replaced is None:
            self.replaced = DataReplaced(url, why)
            log.error("registry: %s", self.replaced)
        return self.replaced


class AlreadyExists(StoreError):
    pass


class CompareFailed(StoreError):
    pass


class PartlyWritten(StoreError):
    """A guarded write went through but the writes meant to go with it did not (etcd v2, which
    has no multi-key transaction, after the guarded write's own request): see
    Store.compare_and_put."""


class HistoryLost(StoreError):
    """The watch index is older than the store's event history; re-read everything."""


@dataclass(frozen=True)
class Credentials:
    """How to reach a secured etcd: TLS files and/or a user with a password."""

    ca_cert: str | None = None
    cert: tuple[str, str] | None = None  # (certificate file, key file) for client-certificate auth
    username: str | None = None
    password: str | None = field(default=None, repr=False)


NO_CREDENTIALS = Credentials()


def require_servers(servers: list[str]) -> None:
    """Both etcd backends refuse an empty member list the same way, at construction."""
    if not servers:
        raise ValueError("no etcd servers given; pass --etcd-servers http://HOST:PORT")


@dataclass(frozen=True)
class Put:
    key: str
    value: str
    create_only: bool = False


@dataclass(frozen=True)
class Delete:
    key: str


Op = Put | Delete


class Listing(dict[str, str]):
    """The records under a prefix, by key, and the store's index when they were read: a watch
    from that index misses no change made since, without another request for the index."""

    def __init__(self, records: dict[str, str], index: int):
        super().__init__(records)
        self.index = index


@dataclass(frozen=True)
class Change:
    """One write seen by a watch: the key's new value, or None when it was deleted or expired."""

    index: int
    key: str
    value: str | None


class Store(Protocol):
    """What the registry needs from a key-value store. Keys are absolute paths, values text."""

    # Whether `apply` of at most 128 ops writes all of them or none (etcd v3, memory; not v2).
    atomic_batches: bool

    async def get(self, key: str) -> str | None: ...
    async def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        """The values of those `keys` that exist, in as few round trips as the store allows:
        one transaction of range reads per 128 keys on etcd v3, concurrent GETs on v2."""
        ...

    async def list(self, prefix: str) -> Listing: ...
    async def put(
        self,
        key: str,
        value: str,
        ttl: float | None = None,
        *,
        create_only: bool = False,
        prev_value: str | None = None,
    ) -> int:
        """Write `value` (a TTL makes it expire unless refreshed); returns the write's index."""
        ...

    async def apply(self, ops: Sequence[Op]) -> int:
        """Several writes in as few round trips as the store allows, at most one per key; returns
        the store's index once they are written (0 when `ops` is empty).

        The unconditional ops take effect before the create-only ones, so a record is never
        seen before what it refers to. etcd v3 makes each transaction of up to 128 ops atomic
        (a create-only op that finds its key writes nothing of that transaction) and sends the
        transactions of unconditional ops alone concurrently; v2 sends concurrent requests.
        Raises AlreadyExists when a create-only key exists.
        """
        ...

    async def compare_and_put(
        self, key: str, value: str, prev_value: str | None, also: Sequence[Op] = ()
    ) -> int:
        """Write `value` at `key` if it holds `prev_value` (if it does not exist, when None), and
        the ops in `also` only with it; returns the index of the write.

        etcd v3 and memory write them all at once (one transaction). etcd v2 has no multi-key
        transaction: it writes `also` after the guarded write succeeded, so a reader that sees
        one of them finds the guarded write in place; when `also` then fails (etcd went away, or
        this fleetd stopped in between), the guarded write stands and PartlyWritten says so.
        Raises CompareFailed (AlreadyExists when `prev_value` is None) and writes nothing when
        the key does not hold what was expected.
        """
        ...

    async def refresh(self, key: str, ttl: float) -> bool: ...
    async def delete(self, key: str, *, prev_value: str | None = None, recursive: bool = False) -> bool: ...
    async def index(self, prefix: str) -> int:
        """The store's current index (etcd's revision), read through a key under `prefix`."""
        ...

    async def wait(self, prefix: str, after_index: int, timeout: float) -> int | None:
        """The index of the first change under `prefix` after `after_index`; None on timeout.

        Raises HistoryLost when the store no longer knows the events after `after_index`.
        """
        ...

    async def changes(self, prefix: str, after_index: int, timeout: float) -> list[Change]:
        """The changes under `prefix` after `after_index`, oldest first: at least one, or none
        after `timeout` seconds. All the changes of one index come in the same answer, and an
        answer never ends on a change that a later write to its key already undid (a reader that
        acts on each answer never acts on a state etcd has left; etcd v2 hands out its history one
        change per request, so its store skips such changes).

        Raises HistoryLost when the store no longer knows them all (or when reading everything
        again is cheaper than catching up); the caller lists the prefix and goes on from there.
        """
        ...

    def last_failure(self) -> float:
        """When (time.monotonic) a request last failed, even if a retry then succeeded."""
        ...

    def outage(self) -> Unavailable | None:
        """Why etcd fails now: what a request would raise if its retries ran out (NoQuorum when
        members answer without a leader), or None when the latest request succeeded."""
        ...

    async def close(self) -> None: ...
