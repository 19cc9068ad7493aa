"""A connection to one systemd manager: calls, jobs that wait for their result, and properties."""

from __future__ import annotations

import asyncio
from typing import Any

from dbus_next import BusType, Message, MessageType
from dbus_next.aio import MessageBus

SYSTEMD_BUS_NAME = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
JOB_REMOVED_RULE = (
    f"type='signal',sender='{SYSTEMD_BUS_NAME}',path='{MANAGER_PATH}',"
    f"interface='{MANAGER_IFACE}',member='JobRemoved'"
)


class SystemdError(RuntimeError):
    """A call to the systemd manager failed; carries the D-Bus error name."""

    def __init__(self, error_name: str, message: str) -> None:
        super().__init__(f"{error_name}: {message}")
        self.error_name = error_name


class SystemdBus:
    """The manager on the system bus, the user bus, or any D-Bus address."""

    # Signals subclasses want besides JobRemoved.
    MATCH_RULES: tuple[str, ...] = ()

    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus
        self._jobs: dict[str, asyncio.Future[str]] = {}
        # JobRemoved can overtake the reply to StartUnit; results that arrive while a
        # job-creating call is in flight wait here for their caller.
        self._early_results: dict[str, str] = {}
        self._calls_in_flight = 0

    @classmethod
    async def connect(cls, bus: str, *args: Any) -> Any:
        """`bus` is "system", "user" ($DBUS_SESSION_BUS_ADDRESS) or an address like unix:path=..."""
        if bus == "system":
            message_bus = MessageBus(bus_type=BusType.SYSTEM)
        elif bus == "user":
            message_bus = MessageBus(bus_type=BusType.SESSION)
        else:
            message_bus = MessageBus(bus_address=bus)
        try:
            await message_bus.connect()
        except (OSError, ValueError) as error:
            raise SystemdError("fleetpy.NoBus", f"cannot connect to the {bus} bus: {error}") from None
        self = cls(message_bus, *args)
        message_bus.add_message_handler(self._on_message)
        try:
            for rule in (JOB_REMOVED_RULE, *cls.MATCH_RULES):
                await self._call(
                    "org.freedesktop.DBus",
                    "/org/freedesktop/DBus",
                    "org.freedesktop.DBus",
                    "AddMatch",
                    "s",
                    [rule],
                )
            await self._manager("Subscribe")  # without it the manager sends no signals
        except BaseException:
            message_bus.disconnect()
            raise
        return self

    async def close(self) -> None:
        for job in self._jobs.values():
            if not job.done():
                job.set_exception(SystemdError("fleetpy.Closed", "connection to systemd closed"))
        self._jobs.clear()
        self._bus.disconnect()
        await self._bus.wait_for_disconnect()

    async def reload(self) -> None:
        await self._manager("Reload")

    async def environment(self) -> dict[str, str]:
        """The manager's own environment: where a user manager looks for unit files depends on it."""
        reply = await self._call(
            SYSTEMD_BUS_NAME, MANAGER_PATH, PROPS_IFACE, "Get", "ss", [MANAGER_IFACE, "Environment"]
        )
        return dict(item.split("=", 1) for item in reply[0].value if "=" in item)

    async def unit_state(self, name: str) -> tuple[str, str, str]:
        """(LoadState, ActiveState, SubState); ("not-found", "inactive", "dead") if unknown."""
        # LoadUnit, unlike GetUnit, also answers for units linked but never started.
        path = (await self._manager("LoadUnit", "s", [name]))[0]
        props = (await self._call(SYSTEMD_BUS_NAME, path, PROPS_IFACE, "GetAll", "s", [UNIT_IFACE]))[0]
        return props["LoadState"].value, props["ActiveState"].value, props["SubState"].value

    async def run_job(self, method: str, name: str) -> str:
        """Call a job method (StartUnit, StopUnit, RestartUnit, ...) and wait for the job's result
        ("done", "failed", "canceled", ...)."""
        self._calls_in_flight += 1
        try:
            job = (await self._manager(method, "ss", [name, "replace"]))[0]
            if job in self._early_results:
                return self._early_results.pop(job)
            result: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self._jobs[job] = result
        finally:
            self._calls_in_flight -= 1
            if not self._calls_in_flight:
                self._early_results.clear()
        try:
            return await result
        finally:
            self._jobs.pop(job, None)

    async def _manager(self, member: str, signature: str = "", body: list[Any] | None = None) -> list[Any]:
        return await self._call(SYSTEMD_BUS_NAME, MANAGER_PATH, MANAGER_IFACE, member, signature, body or [])

    async def _call(
        self, destination: str, path: str, interface: str, member: str, signature: str, body: list[Any]
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
            waiter = self._jobs.get(job)
            if waiter is not None:
                if not waiter.done():
                    waiter.set_result(result)
            elif self._calls_in_flight:
                self._early_results[job] = result
        else:
            self._on_signal(msg)

    def _on_signal(self, msg: Message) -> None:
        """Other signals matched by MATCH_RULES; for subclasses."""
