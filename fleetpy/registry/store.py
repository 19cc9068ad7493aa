"""Key-value stores under the registry: etcd's v2 API, and an in-memory twin for fast tests.

Both speak the same small vocabulary (get, list, put with TTL and compare-and-set, refresh,
delete, watch from an index), so the registry's logic is written once, above them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
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


class StoreError(Exception):
    """A store operation failed in a way the caller can explain to a person."""


class Unavailable(StoreError):
    """etcd did not answer, even after retrying."""


class AlreadyExists(StoreError):
    pass


class CompareFailed(StoreError):
    pass


class HistoryLost(StoreError):
    """The watch index is older than the store's event history; re-read everything."""


class Store(Protocol):
    def get(self, key: str) -> str | None: ...
    def list(self, prefix: str) -> dict[str, str]: ...
    def put(
        self,
        key: str,
        value: str,
        ttl: float | None = None,
        *,
        create_only: bool = False,
        prev_value: str | None = None,
    ) -> None: ...
    def refresh(self, key: str, ttl: float) -> bool: ...
    def delete(self, key: str, *, prev_value: str | None = None, recursive: bool = False) -> bool: ...
    def index(self) -> int: ...
    def wait(self, prefix: str, after_index: int, timeout: float) -> int | None: ...
    def last_failure(self) -> float: ...


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


class EtcdStore:
    """etcd's v2 key space through python-etcd, retrying with bounded exponential backoff."""

    def __init__(
        self,
        servers: list[str],
        *,
        retry_for: float = 10.0,
        request_timeout: float = 5.0,
        ca_cert: str | None = None,
        cert: tuple[str, str] | None = None,
    ):
        if not servers:
            raise ValueError("no etcd servers given; pass --etcd-servers http://HOST:PORT")
        self._servers = [_Server(url, _etcd_client(url, request_timeout, ca_cert, cert)) for url in servers]
        self._current = 0
        self._retry_for = retry_for
        self._last_failure = -float("inf")

    @property
    def _client(self) -> etcd.Client:
        return self._servers[self._current].client

    def _call(self, operation: Callable[[etcd.Client], object]) -> object:
        def attempt() -> object:
            try:
                return operation(self._client)
            except etcd.EtcdWatchTimedOut:
                raise  # a long poll that saw no change: an answer, not a failure
            except _TRANSIENT:
                self._last_failure = time.monotonic()
                # Try the next member on the next attempt; a cluster keeps serving without one.
                self._current = (self._current + 1) % len(self._servers)
                raise

        retrying = Retrying(
            retry=retry_if_exception_type(_TRANSIENT) & retry_if_not_exception_type(etcd.EtcdWatchTimedOut),
            wait=wait_exponential(multiplier=0.05, max=2.0),
            stop=stop_after_delay(self._retry_for),
            reraise=False,
        )
        try:
            return retrying(attempt)
        except RetryError as error:
            urls = ", ".join(s.url for s in self._servers)
            cause = error.last_attempt.exception()
            raise Unavailable(
                f"etcd is unreachable at {urls} ({type(cause).__name__}); "
                "check that etcd runs and --etcd-servers points at it"
            ) from None

    def last_failure(self) -> float:
        """When (time.monotonic) a request last failed, even if a retry then succeeded."""
        return self._last_failure

    def get(self, key: str) -> str | None:
        try:
            return self._call(lambda c: c.read(key)).value
        except etcd.EtcdKeyNotFound:
            return None

    def list(self, prefix: str) -> dict[str, str]:
        try:
            result = self._call(lambda c: c.read(prefix, recursive=True))
        except etcd.EtcdKeyNotFound:
            return {}
        return {leaf.key: leaf.value for leaf in result.leaves if not leaf.dir}

    def put(
        self,
        key: str,
        value: str,
        ttl: float | None = None,
        *,
        create_only: bool = False,
        prev_value: str | None = None,
    ) -> None:
        conditions: dict[str, object] = {}
        if create_only:
            conditions["prevExist"] = False
        if prev_value is not None:
            conditions["prevValue"] = prev_value
        ttl_seconds = None if ttl is None else max(1, round(ttl))
        try:
            self._call(lambda c: c.write(key, value, ttl=ttl_seconds, **conditions))
        except etcd.EtcdAlreadyExist:
            raise AlreadyExists(key) from None
        except (etcd.EtcdCompareFailed, etcd.EtcdKeyNotFound):
            raise CompareFailed(key) from None

    def refresh(self, key: str, ttl: float) -> bool:
        try:
            # A refresh updates the TTL without waking watchers: heartbeats stay invisible.
            self._call(lambda c: c.refresh(key, ttl=max(1, round(ttl)), prevExist=True))
            return True
        except etcd.EtcdKeyNotFound:
            return False

    def delete(self, key: str, *, prev_value: str | None = None, recursive: bool = False) -> bool:
        conditions = {} if prev_value is None else {"prevValue": prev_value}
        try:
            self._call(lambda c: c.delete(key, recursive=recursive or None, **conditions))
            return True
        except etcd.EtcdKeyNotFound:
            return False
        except etcd.EtcdCompareFailed:
            raise CompareFailed(key) from None

    def index(self) -> int:
        try:
            return self._call(lambda c: c.read("/")).etcd_index
        except etcd.EtcdKeyNotFound:  # pragma: no cover - the root always exists
            return 0

    def wait(self, prefix: str, after_index: int, timeout: float) -> int | None:
        try:
            result = self._call(
                lambda c: c.read(
                    prefix, wait=True, waitIndex=after_index + 1, recursive=True, timeout=timeout
                )
            )
        except etcd.EtcdWatchTimedOut:
            return None
        except etcd.EtcdEventIndexCleared:
            raise HistoryLost(prefix) from None
        return result.modifiedIndex


def _etcd_client(url: str, timeout: float, ca_cert: str | None, cert: tuple[str, str] | None) -> etcd.Client:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"bad etcd server URL {url!r}; expected http://HOST:PORT or https://HOST:PORT")
    client = etcd.Client(
        host=parts.hostname,
        port=parts.port or 2379,
        protocol=parts.scheme,
        read_timeout=timeout,
        allow_reconnect=False,
        ca_cert=ca_cert,
        cert=cert,
    )
    # One retry policy, ours: urllib3's own retries would triple every timeout before we see it.
    client.http.connection_pool_kw["retries"] = False
    return client


@dataclass
class _Entry:
    value: str
    index: int
    expires: float | None


class MemoryStore:
    """The same store in memory: indexes, TTLs, compare-and-set and watches, without etcd."""

    HISTORY = 1000  # events kept for watches, as etcd v2 does

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._events: list[tuple[int, str]] = []  # (index, key)
        self._index = 0
        self._changed = threading.Condition()

    def _record(self, key: str) -> None:
        self._index += 1
        self._events.append((self._index, key))
        del self._events[: -self.HISTORY]
        self._changed.notify_all()

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, e in self._entries.items() if e.expires is not None and e.expires <= now]:
            del self._entries[key]
            self._record(key)

    def last_failure(self) -> float:
        return -float("inf")  # memory never fails

    def get(self, key: str) -> str | None:
        with self._changed:
            self._expire()
            entry = self._entries.get(key)
            return entry.value if entry else None

    def list(self, prefix: str) -> dict[str, str]:
        directory = prefix.rstrip("/") + "/"
        with self._changed:
            self._expire()
            return {k: e.value for k, e in sorted(self._entries.items()) if k.startswith(directory)}

    def put(
        self,
        key: str,
        value: str,
        ttl: float | None = None,
        *,
        create_only: bool = False,
        prev_value: str | None = None,
    ) -> None:
        with self._changed:
            self._expire()
            existing = self._entries.get(key)
            if create_only and existing:
                raise AlreadyExists(key)
            if prev_value is not None and (existing is None or existing.value != prev_value):
                raise CompareFailed(key)
            self._record(key)
            expires = None if ttl is None else self._clock() + ttl
            self._entries[key] = _Entry(value, self._index, expires)

    def refresh(self, key: str, ttl: float) -> bool:
        with self._changed:
            self._expire()
            entry = self._entries.get(key)
            if entry is None:
                return False
            entry.expires = self._clock() + ttl
            return True

    def delete(self, key: str, *, prev_value: str | None = None, recursive: bool = False) -> bool:
        with self._changed:
            self._expire()
            keys = [
                k for k in self._entries if k == key or (recursive and k.startswith(key.rstrip("/") + "/"))
            ]
            if prev_value is not None and (
                key not in self._entries or self._entries[key].value != prev_value
            ):
                raise CompareFailed(key)
            for k in keys:
                del self._entries[k]
                self._record(k)
            return bool(keys)

    def index(self) -> int:
        with self._changed:
            return self._index

    def wait(self, prefix: str, after_index: int, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        directory = prefix.rstrip("/")
        with self._changed:
            while True:
                self._expire()
                if (
                    self._events
                    and self._events[0][0] > after_index + 1
                    and after_index < self._index - self.HISTORY
                ):
                    raise HistoryLost(prefix)
                for index, key in self._events:
                    if index > after_index and (key == directory or key.startswith(directory + "/")):
                        return index
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                # Wake at least every 50 ms so TTL expiry is noticed without a writer.
                self._changed.wait(min(remaining, 0.05))
