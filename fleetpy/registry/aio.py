"""The one adapter between fleetd's event loop and the blocking registry."""

from __future__ import annotations

import asyncio
from typing import Any

from fleetpy.registry.registry import Registry


class AsyncRegistry:
    """Every Registry method, awaitable: each call runs in a worker thread.

    python-etcd blocks (watches long-poll for up to their timeout), so fleetd gives it threads
    and keeps the event loop free for D-Bus signals and API requests.
    """

    def __init__(self, registry: Registry):
        self.sync = registry

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.sync, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kwargs)

        return call
