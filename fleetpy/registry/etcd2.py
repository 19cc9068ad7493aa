"""etcd's v2 key space through python-etcd: blocking calls, run in worker threads.

python-etcd blocks, so every call runs in a thread and keeps fleetd's event loop free for D-Bus
signals and API requests. Watches long-poll for minutes; they get daemon threads of their own,
so cancelling a watcher (or stopping fleetd) never waits for the poll to end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import etcd
import urllib3
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_delay,
    wait_exponential,
)

from fleetpy.registry.store import (
    NO_CREDENTIALS,
    AlreadyExists,
    Change,
    CompareFailed,
    Credentials,
    DataLineage,
    HistoryLost,
    Listing,
    Op,
    PartlyWritten,
    Put,
    StoreError,
    Unavailable,
    require_servers,
)

# Writes in flight at once in apply(): below python-etcd's pool of 10 connections.
CONCURRENT_WRITES = 8
# v2 hands out one change per request: a reader further behind than this lists again instead.
CATCH_UP_LIMIT = 500
# Actions whose node holds no value any more.
_GONE = frozenset({"delete", "compareAndDelete", "expire"})


@dataclass(frozen=True)
class _Server:
    url: str
    client: etcd.Client


# Errors that mean "this etcd member did not answer": worth retrying, possibly elsewhere.
_TRANSIENT = (
    etcd.EtcdConnectionFailed,
    etcd.EtcdLeaderElectionInProgress,
    urllib3.exceptions.HTTPError,
    ConnectionError,
)


class EtcdV2Store:
    """etcd's v2 API, retrying with bounded exponential backoff across the members."""

    # No transactions: a batch's ops are separate requests, some may be written and not others.
    atomic_batches = False

    def __init__(
        self,
        servers: list[str],
        *,
        retry_for: float = 10.0,
        request_timeout: float = 5.0,
        credentials: Credentials = NO_CREDENTIALS,
    ):
        require_servers(servers)
        self._servers = [_Server(url, _etcd_client(url, request_timeout, credentials)) for url in servers]
        self._current = 0
        # Refreshes (heartbeats) get a thread of their own: a burst of API requests or state
        # writes that fills the shared worker threads must not let a machine record expire.
        self._refreshes = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="etcd-refresh")
        self._retry_for = retry_for
        self._last_failure = -float("inf")
        self._failing: type[BaseException] | None = None  # the latest request's error, if it failed
        # Members by URL; python-etcd checks the cluster id itself (EtcdClusterIdChanged).
        self._lineage = DataLineage()

    def _call_blocking(self, operation: Callable[[etcd.Client], Any]) -> Any:
        def attempt() -> Any:
            self._lineage.check_usable()
            server = self._servers[self._current]
            floor = self._lineage.floor(server.url)
            try:
                result = operation(server.client)
            except etcd.EtcdWatchTimedOut:
                raise  # a long poll that saw no change: an answer, not a failure
            except etcd.EtcdClusterIdChanged as error:
                raise self._lineage.mismatch(server.url, f"its cluster id changed ({error})") from None
            except _TRANSIENT as error:
                self._last_failure = time.monotonic()
                self._failing = type(error)
                # Try the next member on the next attempt; a cluster keeps serving without one.
                self._current = (self._current + 1) % len(self._servers)
                raise
            except etcd.EtcdException as error:  # etcd's answer, "key not found" say: at its index
                index = (getattr(error, "payload", None) or {}).get("index")
                self._lineage.seen(server.url, server.url, floor, index)
                raise
            self._lineage.seen(server.url, server.url, floor, getattr(result, "etcd_index", None))
            self._failing = None
            return result

        retrying = Retrying(
            retry=retry_if_exception_type(_TRANSIENT) & retry_if_not_exception_type(etcd.EtcdWatchTimedOut),
            wait=wait_exponential(multiplier=0.05, max=2.0),
            stop=stop_after_delay(self._retry_for),
            reraise=False,
        )
        try:
            return retrying(attempt)
        except etcd.EtcdInsufficientPermissions:
            raise StoreError(
                "etcd refused the request: insufficient credentials; check --etcd-username, "
                "--etcd-password-file and the user's permissions on the registry's prefix"
            ) from None
        except RetryError as error:
            raise self._unreachable(type(error.last_attempt.exception())) from None

    async def _call(self, operation: Callable[[etcd.Client], Any]) -> Any:
        return await asyncio.to_thread(self._call_blocking, operation)

    def last_failure(self) -> float:
        return self._last_failure

    def outage(self) -> Unavailable | None:
        if self._lineage.replaced is not None:
            return self._lineage.replaced
        return None if self._failing is None else self._unreachable(self._failing)

    def _unreachable(self, cause: type[BaseException]) -> Unavailable:
        urls = ", ".join(s.url for s in self._servers)
        return Unavailable(
            f"etcd is unreachable at {urls} ({cause.__name__}); check that etcd runs and --etcd-servers points at it"
        )

    async def close(self) -> None:
        self._refreshes.shutdown(wait=False)
        for server in self._servers:
            server.client.http.clear()

    async def get(self, key: str) -> str | None:
        try:
            return (await self._call(lambda c: c.read(key))).value
        except etcd.EtcdKeyNotFound:
            return None

    async def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        """v2 reads one key per request: concurrent GETs, a few at a time (see `apply`)."""
        gate = asyncio.Semaphore(CONCURRENT_WRITES)

        async def one(key: str) -> str | None:
            async with gate:
                return await self.get(key)

        unique = list(dict.fromkeys(keys))
        values = await asyncio.gather(*(one(key) for key in unique))
        return {key: value for key, value in zip(unique, values, strict=True) if value is not None}

    async def list(self, prefix: str) -> Listing:
        try:
            result = await self._call(lambda c: c.read(prefix, recursive=True))
        except etcd.EtcdKeyNotFound as missing:
            return Listing({}, missing.payload["index"])
        return Listing({leaf.key: leaf.value for leaf in result.leaves if not leaf.dir}, result.etcd_index)

    async def put(
        self,
        key: str,
        value: str,
        ttl: float | None = None,
        *,
        create_only: bool = False,
        prev_value: str | None = None,
    ) -> int:
        return await self._write(key, value, ttl, create_only=create_only, prev_value=prev_value)

    async def _write(
        self,
        key: str,
        value: str,
        ttl: float | None = None,
        *,
        create_only: bool = False,
        prev_value: str | None = None,
    ) -> int:
        conditions: dict[str, object] = {}
        if create_only:
            conditions["prevExist"] = False
        if prev_value is not None:
            conditions["prevValue"] = prev_value
        ttl_seconds = None if ttl is None else max(1, round(ttl))
        try:
            result = await self._call(lambda c: c.write(key, value, ttl=ttl_seconds, **conditions))
        except etcd.EtcdAlreadyExist:
            raise AlreadyExists(key) from None
        except (etcd.EtcdCompareFailed, etcd.EtcdKeyNotFound):
            raise CompareFailed(key) from None
        return result.modifiedIndex

    async def apply(self, ops: Sequence[Op]) -> int:
        """v2 has no transactions: concurrent requests, a few at a time (python-etcd keeps a
        pool of 10 connections), unconditional ones first."""
        gate = asyncio.Semaphore(CONCURRENT_WRITES)

        async def one(op: Op) -> int:
            async with gate:
                if isinstance(op, Put):
                    return await self._write(op.key, op.value, create_only=op.create_only)
                return await self._delete(op.key)

        plain = [op for op in ops if not (isinstance(op, Put) and op.create_only)]
        indexes = await asyncio.gather(*(one(op) for op in plain))
        indexes += await asyncio.gather(*(one(op) for op in ops if isinstance(op, Put) and op.create_only))
        return max(indexes, default=0)

    async def compare_and_put(
        self, key: str, value: str, prev_value: str | None, also: Sequence[Op] = ()
    ) -> int:
        """The guarded write, then `also` (v2 has no multi-key transaction): see Store."""
        if prev_value is None:
            index = await self._write(key, value, create_only=True)
        else:
            index = await self._write(key, value, prev_value=prev_value)
        try:
            await self.apply(also)
        except StoreError as error:
            raise PartlyWritten(
                f"{key} was written, but not {', '.join(op.key for op in also)}: {error}"
            ) from None
        return index

    async def refresh(self, key: str, ttl: float) -> bool:
        try:
            # A refresh updates the TTL without waking watchers: heartbeats stay invisible.
            refresh = functools.partial(
                self._call_blocking, lambda c: c.refresh(key, ttl=max(1, round(ttl)), prevExist=True)
            )
            await asyncio.get_running_loop().run_in_executor(self._refreshes, refresh)
            return True
        except etcd.EtcdKeyNotFound:
            return False

    async def delete(self, key: str, *, prev_value: str | None = None, recursive: bool = False) -> bool:
        return await self._delete(key, prev_value=prev_value, recursive=recursive) > 0

    async def _delete(self, key: str, *, prev_value: str | None = None, recursive: bool = False) -> int:
        """The index of the deletion; 0 when there was nothing to delete."""
        conditions = {} if prev_value is None else {"prevValue": prev_value}
        try:
            result = await self._call(lambda c: c.delete(key, recursive=recursive or None, **conditions))
            return result.modifiedIndex
        except etcd.EtcdKeyNotFound:
            return 0
        except etcd.EtcdCompareFailed:
            raise CompareFailed(key) from None

    async def index(self, prefix: str) -> int:
        try:
            return (await self._call(lambda c: c.read(prefix))).etcd_index
        except etcd.EtcdKeyNotFound as missing:
            return missing.payload["index"]

    async def wait(self, prefix: str, after_index: int, timeout: float) -> int | None:
        found = await self._long_poll(prefix, after_index, timeout)
        return None if found is None else found.modifiedIndex

    async def changes(self, prefix: str, after_index: int, timeout: float) -> list[Change]:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            found = await self._long_poll(prefix, after_index, remaining)
            if found is None:
                return []
            if found.dir or found.etcd_index - found.modifiedIndex > CATCH_UP_LIMIT:
                # A whole directory went (or the reader is far behind): one listing says it all.
                raise HistoryLost(prefix)
            change = Change(found.modifiedIndex, found.key, None if found.action in _GONE else found.value)
            # An answer from etcd's event history (its index at or past the change's) may be a
            # change that a later one undid: a schedule entry deleted while its machine was cut
            # off and written again when it came back. Handed out alone, that deletion stopped a
            # running unit, and an etcd outage before the next request kept it stopped.
            if found.etcd_index <= found.modifiedIndex or await self._still_current(change):
                return [change]
            after_index = change.index
        return []

    async def _still_current(self, change: Change) -> bool:
        """Whether `change` still holds: no later write has replaced or removed its key."""
        try:
            now = await self._call(lambda c: c.read(change.key))
        except etcd.EtcdKeyNotFound:
            return change.value is None
        return change.value is not None and now.modifiedIndex == change.index

    async def _long_poll(self, prefix: str, after_index: int, timeout: float) -> etcd.EtcdResult | None:
        loop = asyncio.get_running_loop()
        result: asyncio.Future = loop.create_future()

        def deliver(outcome: Any, failed: bool) -> None:
            if not result.done():
                result.set_exception(outcome) if failed else result.set_result(outcome)

        def poll() -> None:
            try:
                outcome, failed = self._wait_blocking(prefix, after_index, timeout), False
            except Exception as error:  # noqa: BLE001 - handed to the awaiting task, which decides
                outcome, failed = error, True
            # A RuntimeError means the loop is gone: nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(deliver, outcome, failed)

        threading.Thread(target=poll, name="registry-watch", daemon=True).start()
        return await result

    def _wait_blocking(self, prefix: str, after_index: int, timeout: float) -> etcd.EtcdResult | None:
        try:
            return self._call_blocking(
                lambda c: c.read(
                    prefix, wait=True, waitIndex=after_index + 1, recursive=True, timeout=timeout
                )
            )
        except etcd.EtcdWatchTimedOut:
            return None
        except etcd.EtcdEventIndexCleared:
            raise HistoryLost(prefix) from None


def _etcd_client(url: str, timeout: float, credentials: Credentials) -> etcd.Client:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"bad etcd server URL {url!r}; expected http://HOST:PORT or https://HOST:PORT")
    client = etcd.Client(
        host=parts.hostname,
        port=parts.port or 2379,
        protocol=parts.scheme,
        read_timeout=timeout,
        allow_reconnect=False,
        ca_cert=credentials.ca_cert,
        cert=credentials.cert,
        username=credentials.username,
        password=credentials.password,
    )
    # One retry policy, ours: urllib3's own retries would triple every timeout before we see it.
    client.http.connection_pool_kw["retries"] = False
    return client
