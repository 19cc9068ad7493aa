"""Helpers shared by the systemd manager tests: waiting on state signals, installing a unit."""

from __future__ import annotations

import asyncio

from fleetpy.systemd import SystemdManager


class StateLog:
    """Collects on_state_change callbacks and lets a test wait for one, without polling systemd."""

    def __init__(self, manager: SystemdManager) -> None:
        self.events: list[tuple[str, str, str, str]] = []
        self._changed = asyncio.Condition()
        manager.on_state_change(self._record)

    async def _record(self, name: str, load: str, active: str, sub: str) -> None:
        async with self._changed:
            self.events.append((name, load, active, sub))
            self._changed.notify_all()

    async def wait_for(self, event: tuple[str, str, str, str], timeout: float = 5.0) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: event in self.events), timeout)


async def install(manager: SystemdManager, name: str, text: str) -> None:
    assert await manager.write_unit(name, text)
    await manager.link([name])
