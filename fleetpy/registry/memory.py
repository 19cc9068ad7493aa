"""The store in memory, with a clock the tests turn by hand: the fake beside etcd."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fleetpy.registry.store import AlreadyExists, Change, CompareFailed, HistoryLost, Listing, Op, Put


class ManualClock:
    """A monotonic clock that moves only when told: TTLs and watch timeouts without real waits."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class _Entry:
    value: str
    index: int
    expires: float | None


class MemoryStore:
    """Indexes, TTLs, compare-and-set and watches as etcd has them, without etcd.

    TTLs and watch timeouts run on the injected clock. Operations never block, so they are
    atomic on the event loop; watchers are woken through their own loop, so one store may serve
    several loops (a test's and a server thread's).
    """

    atomic_batches = True  # apply checks every create-only key before it writes any

    HISTORY = 1000  # events kept for watches, as etcd v2 does
    # How often a waiting watcher looks at the clock: TTLs expire without any writer.
    POLL = 0.02

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._events: list[Change] = []
        self._index = 0
        self._waiters: set[asyncio.Future] = set()

    def _record(self, key: str, value: str | None) -> None:
        self._index += 1
        self._events.append(Change(self._index, key, value))
        del self._events[: -self.HISTORY]
        self._wake_all()

    def clock_moved(self) -> None:
        """Has every watcher look at the clock at once rather than at its next poll: a test that
        moved the clock on need not wait out a poll in real time."""
        self._wake_all()

    def _wake_all(self) -> None:
        for waiter in list(self._waiters):
            # A loop that is already closed has nobody left waiting.
            with contextlib.suppress(RuntimeError):
                waiter.get_loop().call_soon_threadsafe(_wake, waiter)

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, e in self._entries.items() if e.expires is not None and e.expires <= now]:
            del self._entries[key]
            self._record(key, None)

    def last_failure(self) -> float:
        return -float("inf")  # memory never fails

    def outage(self) -> None:
        return None

    async def close(self) -> None:
        pass

    async def get(self, key: str) -> str | None:
        self._expire()
        entry = self._entries.get(key)
        return entry.value if entry else None

    async def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        self._expire()
        return {k: self._entries[k].value for k in keys if k in self._entries}

    async def list(self, prefix: str) -> Listing:
        directory = prefix.rstrip("/") + "/"
        self._expire()
        return Listing(
            {k: e.value for k, e in sorted(self._entries.items()) if k.startswith(directory)}, self._index
        )

    async def put(
        self,
        key: str,
        value: str,
        ttl: float | None = None,
        *,
        create_only: bool = False,
        prev_value: str | None = None,
    ) -> int:
        self._expire()
        existing = self._entries.get(key)
        if create_only and existing:
            raise AlreadyExists(key)
        if prev_value is not None and (existing is None or existing.value != prev_value):
            raise CompareFailed(key)
        self._record(key, value)
        expires = None if ttl is None else self._clock() + ttl
        self._entries[key] = _Entry(value, self._index, expires)
        return self._index

    async def apply(self, ops: Sequence[Op]) -> int:
        if not ops:
            return 0
        self._expire()
        for op in ops:
            if isinstance(op, Put) and op.create_only and op.key in self._entries:
                raise AlreadyExists(op.key)
        for op in sorted(ops, key=lambda op: isinstance(op, Put) and op.create_only):
            if isinstance(op, Put):
                await self.put(op.key, op.value)
            else:
                await self.delete(op.key)
        return self._index

    async def compare_and_put(
        self, key: str, value: str, prev_value: str | None, also: Sequence[Op] = ()
    ) -> int:
        self._expire()
        existing = self._entries.get(key)
        if prev_value is None and existing is not None:
            raise AlreadyExists(key)
        if prev_value is not None and (existing is None or existing.value != prev_value):
            raise CompareFailed(key)
        index = await self.put(key, value)
        for op in also:
            if isinstance(op, Put):
                await self.put(op.key, op.value)
            else:
                await self.delete(op.key)
        return index

    async def refresh(self, key: str, ttl: float) -> bool:
        self._expire()
        entry = self._entries.get(key)
        if entry is None:
            return False
        entry.expires = self._clock() + ttl
        return True

    async def delete(self, key: str, *, prev_value: str | None = None, recursive: bool = False) -> bool:
        self._expire()
        keys = [k for k in self._entries if k == key or (recursive and k.startswith(key.rstrip("/") + "/"))]
        if prev_value is not None and (key not in self._entries or self._entries[key].value != prev_value):
            raise CompareFailed(key)
        for k in keys:
            del self._entries[k]
            self._record(k, None)
        return bool(keys)

    async def index(self, prefix: str) -> int:
        return self._index

    async def wait(self, prefix: str, after_index: int, timeout: float) -> int | None:
        found = await self.changes(prefix, after_index, timeout)
        return found[0].index if found else None

    async def changes(self, prefix: str, after_index: int, timeout: float) -> list[Change]:
        deadline = self._clock() + timeout
        directory = prefix.rstrip("/")
        while True:
            self._expire()
            if (
                self._events
                and self._events[0].index > after_index + 1
                and after_index < self._index - self.HISTORY
            ):
                raise HistoryLost(prefix)
            found = [
                change
                for change in self._events
                if change.index > after_index
                and (change.key == directory or change.key.startswith(directory + "/"))
            ]
            if found:
                return found
            if self._clock() >= deadline:
                return []
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.add(waiter)
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
                # that arrives as the waiter completes, and the caller would never stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.POLL):
                        await waiter
            finally:
                self._waiters.discard(waiter)


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)
