"""The few systemd manager calls that `cloud-config apply` makes over D-Bus."""

from __future__ import annotations

import asyncio
from typing import Any

from dbus_next import BusType, Message, MessageType
from dbus_next.aio import MessageBus

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
PROPS_IFACE = "org.freedesktop.DBus.Properties"

# coreos.units `command` values and the manager methods that carry them out.
JOB_METHODS = {
    "start": "StartUnit",
    "stop": "StopUnit",
    "restart": "RestartUnit",
    "reload": "ReloadUnit",
    "try-restart": "TryRestartUnit",
    "reload-or-restart": "ReloadOrRestartUnit",
    "reload-or-try-restart": "ReloadOrTryRestartUnit",
}
JOB_TIMEOUT = 90.0


class BusError(RuntimeError):
    """The systemd manager could not be reached or refused a call."""


class Manager:
    """A connection to one systemd manager (system, user, or any bus address)."""

    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus
        # JobRemoved can arrive before the reply that names the job, so every
        # result is kept until its caller has had a chance to look for it.
        self._results: dict[str, str] = {}
        self._waiters: dict[str, asyncio.Future[str]] = {}

    @classmethod
    async def connect(cls, bus: str) -> Manager:
        if bus == "system":
            message_bus = MessageBus(bus_type=BusType.SYSTEM)
        elif bus == "user":
            message_bus = MessageBus(bus_type=BusType.SESSION)
        else:
            message_bus = MessageBus(bus_address=bus)
        try:
            await message_bus.connect()
        except (OSError, ValueError) as err:
            raise BusError(f"cannot connect to the {bus} bus: {err}") from err
        self = cls(message_bus)
        message_bus.add_message_handler(self._on_message)
        rule = f"type='signal',sender='{SYSTEMD}',interface='{MANAGER_IFACE}',member='JobRemoved'"
        try:
            await self._call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                             "AddMatch", "s", [rule])
            await self._manager("Subscribe")
        except BaseException:
            message_bus.disconnect()
            raise
        return self

    def close(self) -> None:
        self._bus.disconnect()

    async def environment(self) -> dict[str, str]:
        """The manager's own environment: where a user manager looks for unit files depends on it."""
        reply = await self._call(SYSTEMD, MANAGER_PATH, PROPS_IFACE, "Get", "ss", [MANAGER_IFACE, "Environment"])
        return dict(item.split("=", 1) for item in reply[0].value if "=" in item)

    async def reload(self) -> None:
        await self._manager("Reload")

    async def active_state(self, name: str) -> str:
        # LoadUnit answers for units that exist on disk but were never started; GetUnit would not.
        path = (await self._manager("LoadUnit", "s", [name]))[0]
        reply = await self._call(SYSTEMD, path, PROPS_IFACE, "Get", "ss", [UNIT_IFACE, "ActiveState"])
        return str(reply[0].value)

    async def run_job(self, command: str, name: str) -> str:
        """Queue `command` (start, stop, ...) for unit `name`; returns the job result ("done", "failed", ...)."""
        job = (await self._manager(JOB_METHODS[command], "ss", [name, "replace"]))[0]
        if job in self._results:
            return self._results.pop(job)
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters[job] = waiter
        try:
            return await asyncio.wait_for(waiter, JOB_TIMEOUT)
        except TimeoutError:
            raise BusError(f"{name}: {command} did not finish within {JOB_TIMEOUT:.0f}s") from None
        finally:
            self._waiters.pop(job, None)

    async def _manager(self, member: str, signature: str = "", body: list[Any] | None = None) -> list[Any]:
        return await self._call(SYSTEMD, MANAGER_PATH, MANAGER_IFACE, member, signature, body or [])

    async def _call(
        self, destination: str, path: str, interface: str, member: str, signature: str, body: list[Any]
    ) -> list[Any]:
        reply = await self._bus.call(Message(destination=destination, path=path, interface=interface,
                                             member=member, signature=signature, body=body))
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            detail = reply.body[0] if reply.body else ""
            raise BusError(f"{member}: {reply.error_name}: {detail}")
        return reply.body

    def _on_message(self, msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL or msg.member != "JobRemoved":
            return
        _id, job, _unit, result = msg.body
        waiter = self._waiters.get(job)
        if waiter is None:
            self._results[job] = result
        elif not waiter.done():
            waiter.set_result(result)
