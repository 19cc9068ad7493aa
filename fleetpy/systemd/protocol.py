"""The seam between the agent and a systemd manager: what the D-Bus manager and the fake share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

# (LoadState, ActiveState, SubState), as systemd names them.
State = tuple[str, str, str]
UNKNOWN_STATE: State = ("not-found", "inactive", "dead")
# callback(name, load, active, sub); may return an awaitable.
StateCallback = Callable[[str, str, str, str], Any]


class SystemdManager(Protocol):
    """Unit files in one directory, linked as runtime units, started, stopped and watched.

    Implemented by `DbusManager` (a real systemd over D-Bus) and `FakeSystemd` (in memory);
    tests/test_systemd_contract.py holds both to the same behaviour.
    """

    unit_dir: Path

    def on_state_change(self, callback: StateCallback) -> None:
        """Call callback(name, load, active, sub) whenever one of our units changes state."""

    async def write_unit(self, name: str, text: str) -> bool:
        """Write the unit file; False if it already held exactly `text`."""

    async def link(self, names: list[str]) -> None:
        """Make written unit files known to systemd (runtime links and a reload)."""

    async def remove_units(self, names: list[str]) -> None:
        """Unlink and delete unit files; names never linked or written are fine."""

    async def start(self, name: str) -> str:
        """Start and wait for the job's result: "done", "failed", "canceled", ..."""

    async def stop(self, name: str) -> str:
        """Stop and wait for the job's result; a failed unit ends inactive, its failure cleared."""

    async def unit_state(self, name: str) -> State:
        """The unit's state; UNKNOWN_STATE for a unit systemd does not know."""

    async def unit_states(self, names: list[str]) -> dict[str, State]:
        """The states of many units, in one request to systemd."""

    async def failure_reason(self, name: str) -> str:
        """systemd's reason when the unit failed or cannot load, e.g. "exit-code: status 1"; else ""."""

    async def main_pid(self, name: str) -> int:
        """The main process of a running service; 0 if none."""

    async def installed_units(self) -> dict[str, str]:
        """Unit files in unit_dir by name, with their text."""

    async def close(self) -> None:
        """Let go of systemd; units keep running."""
