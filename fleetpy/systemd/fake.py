"""An in-memory systemd manager with SystemdManager's interface, for tests of the agent."""

from __future__ import annotations

import inspect
from pathlib import Path

from fleetpy.systemd.bus import SystemdError
from fleetpy.systemd.manager import UNKNOWN_STATE, StateCallback
from fleetpy.unit.name import validate_unit_name


class FakeSystemd:
    """Units go active/running on start and inactive/dead on stop; nothing touches the disk."""

    def __init__(self, unit_dir: str | Path = "/fake/units") -> None:
        self.unit_dir = Path(unit_dir)
        self.files: dict[str, str] = {}
        self.linked: set[str] = set()
        self.states: dict[str, tuple[str, str, str]] = {}
        self.pids: dict[str, int] = {}
        self.jobs: list[tuple[str, str]] = []
        self._callbacks: list[StateCallback] = []
        self._fail_next: set[str] = set()
        self._next_pid = 1000

    @classmethod
    async def connect(cls, bus: str = "fake", unit_dir: str | Path = "/fake/units") -> FakeSystemd:
        return cls(unit_dir)

    async def close(self) -> None:
        pass

    def on_state_change(self, callback: StateCallback) -> None:
        self._callbacks.append(callback)

    def fail_next_start(self, name: str) -> None:
        """Make the next start of name end in "failed" with the unit in failed/failed."""
        self._fail_next.add(name)

    async def write_unit(self, name: str, text: str) -> bool:
        validate_unit_name(name)
        if self.files.get(name) == text:
            return False
        self.files[name] = text
        return True

    async def link(self, names: list[str]) -> None:
        for name in names:
            validate_unit_name(name)
            if name not in self.files:
                raise SystemdError("org.freedesktop.DBus.Error.FileNotFound", f"No such file: {name}")
        self.linked.update(names)

    async def remove_units(self, names: list[str]) -> None:
        for name in names:
            validate_unit_name(name)
            self.files.pop(name, None)
            self.linked.discard(name)
            # Like systemd after a reload, a stopped unit without a file is forgotten.
            if self.states.get(name, UNKNOWN_STATE)[1] in ("inactive", "failed"):
                self.states.pop(name, None)

    async def start(self, name: str) -> str:
        self._require_loaded(name)
        self.jobs.append(("start", name))
        if name in self._fail_next:
            self._fail_next.discard(name)
            await self._set_state(name, ("loaded", "failed", "failed"))
            return "failed"
        if self.states.get(name, UNKNOWN_STATE)[1] != "active":
            self._next_pid += 1
            self.pids[name] = self._next_pid
            await self._set_state(name, ("loaded", "active", "running"))
        return "done"

    async def stop(self, name: str) -> str:
        self._require_loaded(name)
        self.jobs.append(("stop", name))
        self.pids.pop(name, None)
        await self._set_state(name, ("loaded", "inactive", "dead"))
        return "done"

    async def unit_state(self, name: str) -> tuple[str, str, str]:
        validate_unit_name(name)
        if name in self.states:
            return self.states[name]
        return ("loaded", "inactive", "dead") if name in self.linked else UNKNOWN_STATE

    async def unit_states(self, names: list[str]) -> dict[str, tuple[str, str, str]]:
        return {name: await self.unit_state(name) for name in names}

    async def main_pid(self, name: str) -> int:
        validate_unit_name(name)
        return self.pids.get(name, 0)

    async def installed_units(self) -> dict[str, str]:
        return dict(sorted(self.files.items()))

    def _require_loaded(self, name: str) -> None:
        validate_unit_name(name)
        if name not in self.linked:
            raise SystemdError("org.freedesktop.systemd1.NoSuchUnit", f"Unit {name} not found.")

    async def _set_state(self, name: str, state: tuple[str, str, str]) -> None:
        if self.states.get(name) == state:
            return
        self.states[name] = state
        for callback in self._callbacks:
            result = callback(name, *state)
            # Awaited in line, so a test sees the callback's effects when start() returns.
            if inspect.isawaitable(result):
                await result
