"""One watch on the whole registry, shared by every live view (`fleetctl events -f`, the dashboard)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web

from fleetpy.registry import HistoryLost, Registry, StoreError

log = logging.getLogger(__name__)

WATCH_TIMEOUT = 60.0
# A burst of writes (a unit starting touches schedule/, state/ and events/) wakes viewers once.
DEBOUNCE = 0.1
OUTAGE_PAUSE = 1.0


class Changes:
    """A counter that goes up whenever anything in the registry changed.

    Viewers wait for it to pass the value they last saw, then re-read what they show: one
    etcd watch serves them all, and it runs only while someone is watching.
    """

    def __init__(self, registry: Registry):
        self.registry = registry
        self.version = 0
        self._changed: asyncio.Condition | None = None
        self._task: asyncio.Task | None = None
        self._viewers = 0

    async def wait(self, seen: int, timeout: float) -> int:
        """The version once it is past `seen`, or as it is after `timeout` seconds."""
        if self._changed is None:
            self._changed = asyncio.Condition()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._watch())
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(lambda: self.version > seen), timeout)
        return self.version

    async def _watch(self) -> None:
        index = None
        while True:
            try:
                if index is None:
                    index = await self.registry.index()
                if await self.registry.wait(index, timeout=WATCH_TIMEOUT) is None:
                    continue
                await asyncio.sleep(DEBOUNCE)
                index = None  # viewers re-read everything up to now
            except HistoryLost:
                index = None
            except StoreError as error:
                log.warning("api: watching the registry: %s", error)
                index = None
                await asyncio.sleep(OUTAGE_PAUSE)
                continue
            except Exception:  # noqa: BLE001 - live views must outlive a bad moment
                log.exception("api: watching the registry failed; watching again")
                index = None
                await asyncio.sleep(OUTAGE_PAUSE)
                continue
            await self._bump()

    async def _bump(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self.version += 1
            self._changed.notify_all()

    async def close(self, _app: web.Application | None = None) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
