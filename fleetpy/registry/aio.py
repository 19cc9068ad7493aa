"""The one adapter between fleetd's event loop and the blocking registry."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

from fleetpy.registry.registry import Registry


class AsyncRegistry:
    """Every Registry method, awaitable: each call runs in a worker thread.

    python-etcd blocks, so fleetd gives it threads and keeps the event loop free for D-Bus
    signals and API requests. Watches long-poll for minutes; they get daemon threads of their
    own, so cancelling a watcher (or stopping fleetd) never waits for the poll to end.
    """

    def __init__(self, registry: Registry):
        self.sync = registry

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.sync, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kwargs)

        return call

    async def wait(self, after_index: int, *parts: str, timeout: float = 30.0) -> int | None:
        loop = asyncio.get_running_loop()
        result: asyncio.Future = loop.create_future()

        def deliver(outcome: Any, failed: bool) -> None:
            if not result.done():
                result.set_exception(outcome) if failed else result.set_result(outcome)

        def poll() -> None:
            try:
                outcome, failed = self.sync.wait(after_index, *parts, timeout=timeout), False
            except Exception as error:  # noqa: BLE001 - handed to the awaiting task, which decides
                outcome, failed = error, True
            # A RuntimeError means the loop is gone: nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(deliver, outcome, failed)

        threading.Thread(target=poll, name="registry-watch", daemon=True).start()
        return await result
