"""The agent's view of one systemd manager: its unit files, their jobs and their state signals."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import signal
from pathlib import Path
from typing import Any

from dbus_next import Message
from dbus_next.aio import MessageBus

from fleetpy.conf.files import write_atomic
from fleetpy.systemd.bus import (
    MANAGER_PATH,
    PROPS_IFACE,
    SYSTEMD_BUS_NAME,
    UNIT_IFACE,
    SystemdBus,
    SystemdError,
)
from fleetpy.systemd.protocol import State, StateCallback
from fleetpy.unit.name import is_unit_name, validate_unit_name

log = logging.getLogger(__name__)

SERVICE_IFACE = "org.freedesktop.systemd1.Service"
UNIT_PATH_PREFIX = MANAGER_PATH + "/unit/"
NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"
STATE_PROPERTIES = ("LoadState", "ActiveState", "SubState")
CLD_EXITED = 1  # ExecMainCode: the main process exited (2, 3: killed, dumped core)


def unit_path_to_name(path: str) -> str:
    """Turn /org/freedesktop/systemd1/unit/hello_2eservice into hello.service."""
    escaped = path[len(UNIT_PATH_PREFIX) :]
    return re.sub(r"_([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), escaped)


def unit_name_to_path(name: str) -> str:
    """Turn hello.service into /org/freedesktop/systemd1/unit/hello_2eservice (systemd's
    bus_label_escape: ASCII letters and digits stay, except a leading digit)."""
    return UNIT_PATH_PREFIX + "".join(
        c if c.isascii() and c.isalnum() and (i or not c.isdigit()) else f"_{ord(c):02x}"
        for i, c in enumerate(name)
    )


class DbusManager(SystemdBus):
    """The SystemdManager of a real systemd: unit files in one directory, linked as runtime
    units, started and stopped through jobs, watched through PropertiesChanged signals."""

    # Only the Unit interface's changes (arg0): those carry the three states. Matching every
    # interface's PropertiesChanged too would triple what dbus-next unmarshals in a burst.
    MATCH_RULES = (
        (
            f"type='signal',sender='{SYSTEMD_BUS_NAME}',path_namespace='{MANAGER_PATH}/unit',"
            f"interface='{PROPS_IFACE}',member='PropertiesChanged',arg0='{UNIT_IFACE}'"
        ),
    )

    def __init__(self, bus: MessageBus, address: str, unit_dir: Path) -> None:
        super().__init__(bus, address)
        self.unit_dir = unit_dir
        self._callbacks: list[StateCallback] = []
        # systemd emits several PropertiesChanged per transition; report each state once.
        self._last_state: dict[str, tuple[str, str, str]] = {}
        self._reading: set[str] = set()  # units whose state is being read after a partial signal
        # Object paths of the units whose files are in unit_dir: the only ones whose
        # PropertiesChanged signals are read.
        self._paths = {unit_name_to_path(p.name) for p in unit_dir.iterdir() if is_unit_name(p.name)}

    @classmethod
    async def connect(cls, bus: str, unit_dir: str | Path) -> DbusManager:
        unit_dir = Path(unit_dir)
        unit_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        return await super().connect(bus, unit_dir.resolve())

    def on_state_change(self, callback: StateCallback) -> None:
        """Call callback(name, load, active, sub) whenever one of our units changes state."""
        self._callbacks.append(callback)

    async def write_unit(self, name: str, text: str) -> bool:
        path = self._unit_file(name)
        try:
            if path.read_text() == text:
                return False
        except FileNotFoundError:
            pass
        # Its temporary name ends in '~', so installed_units() never mistakes it for a unit.
        write_atomic(path, text)
        self._paths.add(unit_name_to_path(name))
        return True

    async def link(self, names: list[str]) -> None:
        paths = [str(self._unit_file(name)) for name in names]
        await self._manager("LinkUnitFiles", "asbb", [paths, True, True])
        # systemd loads a unit it never loaded from its file when first asked: a reload is needed
        # only for one it holds an older copy of. A reload re-reads every unit systemd knows
        # (27-38 ms with a handful, longer with more) and answers nothing meanwhile, so it was
        # most of a single start.
        states = await self.unit_states(names)  # one read, so their later signals carry the news
        if any(load != "loaded" for load, _, _ in states.values()) or await self._held_old_copy(names):
            await self._manager("Reload")
            await self.unit_states(names)

    async def _held_old_copy(self, names: list[str]) -> bool:
        """Whether systemd runs any of these units from a file that changed since it loaded it."""
        flags = await asyncio.gather(*(self._unit_property(n, UNIT_IFACE, "NeedDaemonReload") for n in names))
        return any(flags)

    async def remove_units(self, names: list[str]) -> None:
        files = [self._unit_file(name) for name in names]
        # Disabling in the runtime scope removes the links LinkUnitFiles made there.
        try:
            await self._manager("DisableUnitFiles", "asb", [list(names), True])
        except SystemdError as e:
            if e.error_name != NO_SUCH_UNIT:
                raise
            # One name was never linked and systemd refuses the whole batch: go one by one.
            for name in names:
                try:
                    await self._manager("DisableUnitFiles", "asb", [[name], True])
                except SystemdError as e:
                    if e.error_name != NO_SUCH_UNIT:
                        raise
        for path in files:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self._last_state.pop(path.name, None)
            self._paths.discard(unit_name_to_path(path.name))
        # systemd keeps a failed unit in memory after its file is gone; one assigned here again
        # later must start from a clean slate, not look failed already.
        for name, (_load, active, _sub) in (await self.unit_states(list(names))).items():
            if active == "failed":
                with contextlib.suppress(SystemdError):
                    await self._manager("ResetFailedUnit", "s", [name])
        await self._manager("Reload")

    async def start(self, name: str) -> str:
        validate_unit_name(name)
        return await self.run_job("StartUnit", name)

    async def stop(self, name: str) -> str:
        validate_unit_name(name)
        known = self._last_state.get(name)
        result = await self.run_job("StopUnit", name)
        # A failed unit stays failed through StopUnit; stopped means inactive, failure cleared.
        # Signals keep our units' states known, so asking systemd is seldom needed.
        if known is None:
            known = await self.unit_state(name)
        if known[1] == "failed":
            await self._manager("ResetFailedUnit", "s", [name])
        return result

    async def unit_states(self, names: list[str]) -> dict[str, State]:
        for name in names:
            validate_unit_name(name)
        states = await super().unit_states(names)
        for name, state in states.items():
            if (self.unit_dir / name).is_file():
                self._notify(name, *state)  # what a read finds is news too, if it is new
        return states

    async def failure_reason(self, name: str) -> str:
        load, active, _ = await self.unit_state(name)
        if load not in ("loaded", "not-found"):
            # bad-setting, error, masked: LoadError is (D-Bus error name, message).
            _error, message = await self._unit_property(name, UNIT_IFACE, "LoadError")
            return f"{load}: {message}" if message else load
        if active != "failed":
            return ""
        kind = name.rpartition(".")[2]
        result = await self._unit_property(name, f"org.freedesktop.systemd1.{kind.capitalize()}", "Result")
        if kind != "service" or result not in ("exit-code", "signal", "core-dump"):
            return result
        code = await self._unit_property(name, SERVICE_IFACE, "ExecMainCode")
        status = await self._unit_property(name, SERVICE_IFACE, "ExecMainStatus")
        if code == CLD_EXITED:
            return f"{result}: the main process exited with status {status}"
        try:
            return f"{result}: the main process was killed by {signal.Signals(status).name}"
        except ValueError:
            return f"{result}: the main process was killed by signal {status}"

    async def _unit_property(self, name: str, interface: str, prop: str) -> Any:
        # systemd loads the unit an object path names when asked about it: no LoadUnit first.
        reply = await self._call(
            SYSTEMD_BUS_NAME, unit_name_to_path(name), PROPS_IFACE, "Get", "ss", [interface, prop]
        )
        return reply[0].value

    async def main_pid(self, name: str) -> int:
        validate_unit_name(name)
        if not name.endswith(".service"):
            return 0
        return int(await self._unit_property(name, SERVICE_IFACE, "MainPID"))

    async def installed_units(self) -> dict[str, str]:
        units = {}
        for path in sorted(self.unit_dir.iterdir()):
            if path.is_file() and not path.is_symlink() and is_unit_name(path.name):
                units[path.name] = path.read_text()
        return units

    def _unit_file(self, name: str) -> Path:
        # A unit name holds no "/" and is never "." or "..", so it names a file in unit_dir;
        # the check below keeps that true even if the name rules change.
        validate_unit_name(name)
        path = (self.unit_dir / name).resolve()
        if path.parent != self.unit_dir:
            raise ValueError(f"{name!r}: unit file would leave {self.unit_dir}")
        return path

    def _wants_signal(self, path: str | None, member: str | None) -> bool:
        return member != "PropertiesChanged" or path in self._paths

    def _on_signal(self, msg: Message) -> None:
        if (
            msg.member == "PropertiesChanged"
            and msg.path.startswith(UNIT_PATH_PREFIX)
            and msg.body[0] == UNIT_IFACE
            and self._callbacks
        ):
            self._on_unit_properties(unit_path_to_name(msg.path), msg.body[1])

    def _on_unit_properties(self, name: str, changed: dict[str, Any]) -> None:
        if not (self.unit_dir / name).is_file():
            return
        update = {i: changed[prop].value for i, prop in enumerate(STATE_PROPERTIES) if prop in changed}
        known = self._last_state.get(name)
        if len(update) == len(STATE_PROPERTIES) or (update and known is not None):
            # systemd sends what changed, in order: laid over the last known state, it is current.
            load, active, sub = (update.get(i, known[i] if known else "") for i in range(3))
            self._notify(name, load, active, sub)
        elif update and name not in self._reading:
            # A partial update of a unit we know nothing of yet: read the rest once.
            self._reading.add(name)
            self._spawn(self._read(name))

    async def _read(self, name: str) -> None:
        try:
            await self.unit_states([name])
        finally:
            self._reading.discard(name)

    def _notify(self, name: str, load: str, active: str, sub: str) -> None:
        if self._last_state.get(name) == (load, active, sub):
            return
        self._last_state[name] = (load, active, sub)
        for callback in self._callbacks:
            result = callback(name, load, active, sub)
            if inspect.isawaitable(result):
                self._spawn(result)

    def _resubscribed(self) -> None:
        # Signals were missed: forget what we knew, read every unit of ours once and report
        # what changed meanwhile.
        self._last_state.clear()
        self._spawn(self._catch_up())

    async def _catch_up(self) -> None:
        try:
            await self.unit_states(list(await self.installed_units()))
        except SystemdError as error:
            log.warning("cannot read the states of our units after reconnecting: %s", error)
