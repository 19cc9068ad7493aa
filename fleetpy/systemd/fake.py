"""An in-memory SystemdManager for fast tests of the agent."""

from __future__ import annotations

import inspect
from pathlib import Path

from fleetpy.systemd.bus import SystemdError
from fleetpy.systemd.protocol import UNKNOWN_STATE, State, StateCallback
from fleetpy.unit.name import validate_unit_name

BAD_SETTING_ERROR = "org.freedesktop.systemd1.BadUnitSetting"

# What FakeSystemd reads in a unit's text, standing in for systemd running it.
FAILING_COMMAND = "ExecStart=/bin/false"


class FakeSystemd:
    """Units go active/running on start and inactive/dead on stop; nothing touches the disk.

    Like systemd, a service without ExecStart= cannot load (bad-setting) and one whose ExecStart
    is /bin/false fails when started.
    """

    def __init__(self, unit_dir: str | Path = "/fake/units") -> None:
        self.unit_dir = Path(unit_dir)
        self.files: dict[str, str] = {}
        self.linked: set[str] = set()
        self.states: dict[str, State] = {}
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
        if self._load_state(name) == "bad-setting":
            raise SystemdError(BAD_SETTING_ERROR, f"Unit {name} has a bad unit file setting.")
        self.jobs.append(("start", name))
        if name in self._fail_next or FAILING_COMMAND in self.files[name].splitlines():
            self._fail_next.discard(name)
            self.pids.pop(name, None)
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

    async def unit_state(self, name: str) -> State:
        validate_unit_name(name)
        if name in self.states:
            return self.states[name]
        return (self._load_state(name), "inactive", "dead") if name in self.linked else UNKNOWN_STATE

    async def unit_states(self, names: list[str]) -> dict[str, State]:
        return {name: await self.unit_state(name) for name in names}

    async def failure_reason(self, name: str) -> str:
        load, active, _ = await self.unit_state(name)
        if load == "bad-setting":
            return f"bad-setting: Unit {name} has a bad unit file setting."
        return "exit-code: the main process exited with status 1" if active == "failed" else ""

    async def main_pid(self, name: str) -> int:
        validate_unit_name(name)
        return self.pids.get(name, 0)

    async def installed_units(self) -> dict[str, str]:
        return dict(sorted(self.files.items()))

    def _load_state(self, name: str) -> str:
        text = self.files.get(name, "")
        if name.endswith(".service") and not any(line.startswith("ExecStart=") for line in text.splitlines()):
            return "bad-setting"
        return "loaded"

    def _require_loaded(self, name: str) -> None:
        validate_unit_name(name)
        if name not in self.linked:
            raise SystemdError("org.freedesktop.systemd1.NoSuchUnit", f"Unit {name} not found.")

    async def _set_state(self, name: str, state: State) -> None:
        if self.states.get(name) == state:
            return
        self.states[name] = state
        for callback in self._callbacks:
            result = callback(name, *state)
            # Awaited in line, so a test sees the callback's effects when start() returns.
            if inspect.isawaitable(result):
                await result
