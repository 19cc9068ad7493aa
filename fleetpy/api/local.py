"""Status and journal of units on this machine, from systemctl and journalctl.

Both commands run with argument lists, never through a shell, so a unit name can never become
shell syntax; names are validated before they get here anyway.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Literal, Protocol


class LocalUnitInfo(Protocol):
    """What the API needs to show a unit that runs on this machine."""

    async def status(self, name: str) -> str:
        """`systemctl status` output for the unit."""
        ...

    def journal(self, name: str, lines: int, follow: bool) -> AsyncIterator[str]:
        """The unit's last `lines` journal lines, then new ones as they come if `follow`."""
        ...


class SystemctlUnitInfo:
    """LocalUnitInfo over the systemctl and journalctl binaries of the user or system manager.

    `env` is added to fleetd's own environment for the commands: a user manager is found
    through XDG_RUNTIME_DIR / DBUS_SESSION_BUS_ADDRESS.
    """

    def __init__(self, bus: Literal["user", "system"], env: dict[str, str] | None = None):
        if bus not in ("user", "system"):
            raise ValueError(f"bus must be 'user' or 'system', not {bus!r}")
        self.bus = bus
        self.env = {**os.environ, **(env or {})}

    def status_argv(self, name: str) -> list[str]:
        return ["systemctl", f"--{self.bus}", "status", "--no-pager", "--", name]

    def journal_argv(self, name: str, lines: int, follow: bool) -> list[str]:
        selector = "--user-unit" if self.bus == "user" else "--unit"
        # NAME=VALUE keeps a name starting with "-" from being read as an option.
        argv = ["journalctl", f"{selector}={name}", "-n", str(lines), "--no-pager"]
        return argv + ["-f"] if follow else argv

    async def status(self, name: str) -> str:
        process = await asyncio.create_subprocess_exec(
            *self.status_argv(name),
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        # systemctl status exits 3 for a stopped unit and still prints it: the text is the answer.
        output, _ = await process.communicate()
        return output.decode(errors="replace")

    async def journal(self, name: str, lines: int, follow: bool) -> AsyncIterator[str]:
        process = await asyncio.create_subprocess_exec(
            *self.journal_argv(name, lines, follow),
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert process.stdout is not None
        try:
            async for line in process.stdout:
                yield line.decode(errors="replace")
        finally:
            # A follower stops when its reader goes away; journalctl -f would run forever.
            if process.returncode is None:
                process.kill()
            await process.wait()
