"""The agent's view of one systemd manager over D-Bus: unit files, jobs and unit state signals."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dbus_next import BusType, Message, MessageType
from dbus_next.aio import MessageBus

SYSTEMD_BUS_NAME = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
UNIT_PATH_PREFIX = MANAGER_PATH + "/unit/"
UNKNOWN_STATE = ("not-found", "inactive", "dead")
NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"

_UNIT_NAME_RE = re.compile(r"^[a-zA-Z0-9:_.@-]+$")

StateCallback = Callable[[str, str, str, str], Any]


class SystemdError(RuntimeError):
    """A call to the systemd manager failed; carries the D-Bus error name."""

    def __init__(self, error_name: str, message: str) -> None:
        super().__init__(f"{error_name}: {message}")
        self.error_name = error_name


def validate_unit_name(name: str) -> None:
    """Raise ValueError unless name is a plain unit file name."""
    if not _UNIT_NAME_RE.match(name) or ".." in name:
        raise ValueError(f"{name!r}: unit names may contain only letters, digits and ':_.@-', and no '..'")


def unit_path_to_name(path: str) -> str:
    """Turn /org/freedesktop/systemd1/unit/hello_2eservice into hello.service."""
    escaped = path[len(UNIT_PATH_PREFIX) :]
    return re.sub(r"_([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), escaped)


class SystemdManager:
    def __init__(self, bus: MessageBus, unit_dir: Path) -> None:
        self._bus = bus
        self.unit_dir = unit_dir
        self._callbacks: list[StateCallback] = []
        self._jobs: dict[str, asyncio.Future[str]] = {}
        # JobRemoved can overtake the reply to StartUnit; results that arrive
        # while a job-creating call is in flight wait here for their caller.
        self._early_results: dict[str, str] = {}
        self._calls_in_flight = 0
        self._tasks: set[asyncio.Task] = set()
        # systemd emits several PropertiesChanged per transition; report each state once.
        self._last_state: dict[str, tuple[str, str, str]] = {}

    @classmethod
    async def connect(cls, bus: str, unit_dir: str | Path) -> SystemdManager:
        if bus == "user":
            message_bus = MessageBus(bus_type=BusType.SESSION)
        elif bus == "system":
            message_bus = MessageBus(bus_type=BusType.SYSTEM)
        else:
            message_bus = MessageBus(bus_address=bus)
        await message_bus.connect()
        unit_dir = Path(unit_dir)
        unit_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        self = cls(message_bus, unit_dir.resolve())
        message_bus.add_message_handler(self._on_message)
        try:
            signal = f"type='signal',sender='{SYSTEMD_BUS_NAME}'"
            for rule in (
                f"{signal},path='{MANAGER_PATH}',interface='{MANAGER_IFACE}',member='JobRemoved'",
                f"{signal},path_namespace='{MANAGER_PATH}/unit',interface='{PROPS_IFACE}',member='PropertiesChanged'",
            ):
                await self._call(
                    "org.freedesktop.DBus",
                    "/org/freedesktop/DBus",
                    "org.freedesktop.DBus",
                    "AddMatch",
                    "s",
                    [rule],
                )
            await self._manager("Subscribe")
        except BaseException:
            message_bus.disconnect()
            raise
        return self

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for fut in self._jobs.values():
            if not fut.done():
                fut.set_exception(SystemdError("fleetpy.Closed", "connection to systemd closed"))
        self._jobs.clear()
        self._bus.disconnect()
        await self._bus.wait_for_disconnect()

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
        # The tmp name contains '~' so installed_units() never mistakes it for a unit.
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp~", dir=self.unit_dir)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        return True

    async def link(self, names: list[str]) -> None:
        paths = [str(self._unit_file(name)) for name in names]
        await self._manager("LinkUnitFiles", "asbb", [paths, True, True])
        await self._manager("Reload")

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
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            self._last_state.pop(path.name, None)
        await self._manager("Reload")

    async def start(self, name: str) -> str:
        return await self._run_job("StartUnit", name)

    async def stop(self, name: str) -> str:
        return await self._run_job("StopUnit", name)

    async def unit_state(self, name: str) -> tuple[str, str, str]:
        validate_unit_name(name)
        # LoadUnit, unlike GetUnit, also answers for units linked but never started.
        path = (await self._manager("LoadUnit", "s", [name]))[0]
        props = (await self._call(SYSTEMD_BUS_NAME, path, PROPS_IFACE, "GetAll", "s", [UNIT_IFACE]))[0]
        return (
            props["LoadState"].value,
            props["ActiveState"].value,
            props["SubState"].value,
        )

    async def main_pid(self, name: str) -> int:
        validate_unit_name(name)
        if not name.endswith(".service"):
            return 0
        path = (await self._manager("LoadUnit", "s", [name]))[0]
        reply = await self._call(SYSTEMD_BUS_NAME, path, PROPS_IFACE, "Get", "ss", [SERVICE_IFACE, "MainPID"])
        return int(reply[0].value)

    async def installed_units(self) -> dict[str, str]:
        units = {}
        for path in sorted(self.unit_dir.iterdir()):
            if (
                path.is_file()
                and not path.is_symlink()
                and _UNIT_NAME_RE.match(path.name)
                and ".." not in path.name
            ):
                units[path.name] = path.read_text()
        return units

    def _unit_file(self, name: str) -> Path:
        validate_unit_name(name)
        path = (self.unit_dir / name).resolve()
        if path.parent != self.unit_dir:
            raise ValueError(f"{name!r}: unit file would leave {self.unit_dir}")
        return path

    async def _run_job(self, method: str, name: str) -> str:
        validate_unit_name(name)
        self._calls_in_flight += 1
        try:
            job = (await self._manager(method, "ss", [name, "replace"]))[0]
            if job in self._early_results:
                return self._early_results.pop(job)
            fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self._jobs[job] = fut
        finally:
            self._calls_in_flight -= 1
            if not self._calls_in_flight:
                self._early_results.clear()
        try:
            return await fut
        finally:
            self._jobs.pop(job, None)

    async def _manager(self, member: str, signature: str = "", body: list[Any] | None = None) -> list[Any]:
        return await self._call(SYSTEMD_BUS_NAME, MANAGER_PATH, MANAGER_IFACE, member, signature, body or [])

    async def _call(
        self,
        destination: str,
        path: str,
        interface: str,
        member: str,
        signature: str,
        body: list[Any],
    ) -> list[Any]:
        reply = await self._bus.call(
            Message(
                destination=destination,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=body,
            )
        )
        if reply.message_type == MessageType.ERROR:
            raise SystemdError(reply.error_name, str(reply.body[0]) if reply.body else "")
        return reply.body

    def _on_message(self, msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL:
            return
        if msg.member == "JobRemoved" and msg.interface == MANAGER_IFACE:
            _id, job, _unit, result = msg.body
            fut = self._jobs.get(job)
            if fut is not None:
                if not fut.done():
                    fut.set_result(result)
            elif self._calls_in_flight:
                self._early_results[job] = result
        elif (
            msg.member == "PropertiesChanged"
            and msg.path.startswith(UNIT_PATH_PREFIX)
            and msg.body[0] == UNIT_IFACE
            and self._callbacks
        ):
            self._on_unit_properties(unit_path_to_name(msg.path), msg.body[1])

    def _on_unit_properties(self, name: str, changed: dict[str, Any]) -> None:
        if not (self.unit_dir / name).is_file():
            return
        if {"LoadState", "ActiveState", "SubState"} <= changed.keys():
            self._notify(
                name,
                changed["LoadState"].value,
                changed["ActiveState"].value,
                changed["SubState"].value,
            )
        elif "ActiveState" in changed or "SubState" in changed or "LoadState" in changed:
            # A partial update: read the rest rather than report a stale mix.
            self._spawn(self._refresh(name))

    async def _refresh(self, name: str) -> None:
        self._notify(name, *await self.unit_state(name))

    def _notify(self, name: str, load: str, active: str, sub: str) -> None:
        if self._last_state.get(name) == (load, active, sub):
            return
        self._last_state[name] = (load, active, sub)
        for callback in self._callbacks:
            result = callback(name, load, active, sub)
            if inspect.isawaitable(result):
                self._spawn(result)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
