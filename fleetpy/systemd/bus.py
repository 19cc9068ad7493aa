"""A connection to one systemd manager: calls, jobs that wait for their result, and properties."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from typing import Any

from dbus_next import BusType, Message, MessageType
from dbus_next._private.unmarshaller import Unmarshaller
from dbus_next.aio import MessageBus

from fleetpy.conf import metrics

SYSTEMD_BUS_NAME = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
# Calls awaiting a reply on one connection. The system bus's dbus-daemon refuses more than 128
# per connection (max_replies_per_connection); below that, a burst queues here, not in the socket.
MAX_CALLS_IN_FLIGHT = 64
# Pauses between attempts to connect again after the bus connection was lost.
RECONNECT_PAUSES = (0.1, 0.5, 1.0, 2.0, 5.0)
JOB_REMOVED_RULE = (
    f"type='signal',sender='{SYSTEMD_BUS_NAME}',path='{MANAGER_PATH}',"
    f"interface='{MANAGER_IFACE}',member='JobRemoved'"
)


log = logging.getLogger(__name__)


async def _open(bus: str) -> MessageBus:
    if bus == "system":
        message_bus = MessageBus(bus_type=BusType.SYSTEM)
    elif bus == "user":
        message_bus = MessageBus(bus_type=BusType.SESSION)
    else:
        message_bus = MessageBus(bus_address=bus)
    try:
        await message_bus.connect()
    except (OSError, ValueError, EOFError) as error:
        raise SystemdError("fleetpy.NoBus", f"cannot connect to the {bus} bus: {error}") from None
    return message_bus


class SystemdError(RuntimeError):
    """A call to the systemd manager failed; carries the D-Bus error name."""

    def __init__(self, error_name: str, message: str) -> None:
        super().__init__(f"{error_name}: {message}")
        self.error_name = error_name


class _EagainSafeSocket:
    """The bus socket as dbus-next's writer sees it: EAGAIN from send() means "0 bytes sent".

    dbus-next 0.2.3 treats a full socket buffer (BlockingIOError) as a fatal error and drops the
    connection. Reporting 0 bytes instead makes its writer wait until the socket is writable,
    which is what EAGAIN asks for.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def send(self, data: bytes) -> int:
        try:
            return self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


# D-Bus header field codes (the D-Bus specification's "Header Fields").
_PATH_FIELD, _MEMBER_FIELD = 1, 3


class _SkippingUnmarshaller(Unmarshaller):
    """dbus-next's reader of one message, which leaves the body of an unwanted signal unread.

    systemd sends PropertiesChanged for every unit of the manager, also for the slice and
    targets every started unit joins, whose dependency lists grow with each unit: starting 20
    units sent 183 of them, 123 about app.slice and two targets. Decoding their bodies in
    dbus-next's pure Python took most of a lab agent's CPU in a burst of starts (py-spy: 114 of
    194 samples). The header comes first and the whole message is in the buffer by then, so
    the body can be left unread; such a message arrives with a body of Nones.
    """

    def __init__(self, stream: Any, sock: Any, wanted: Any) -> None:
        super().__init__(stream, sock)
        self._wanted = wanted  # wanted(path, member) -> bool

    def _unmarshall(self) -> Any:
        # Called again from the start when the message was not all there yet. The first
        # argument read is the header's field array; the arguments after it, the body's.
        self.read_argument = self._read_header  # type: ignore[method-assign]
        return super()._unmarshall()

    def _read_header(self, type_: Any) -> Any:
        del self.read_argument  # the header's own parts, and a wanted body, read as dbus-next does
        fields = super().read_argument(type_)
        values = {code: variant.value for code, variant in fields}
        if not self._wanted(values.get(_PATH_FIELD), values.get(_MEMBER_FIELD)):
            self.read_argument = _unread  # type: ignore[method-assign]
        return fields


def _unread(type_: Any) -> None:
    return None


class SystemdBus:
    """The manager on the system bus, the user bus, or any D-Bus address."""

    # Signals subclasses want besides JobRemoved.
    MATCH_RULES: tuple[str, ...] = ()

    def __init__(self, bus: MessageBus, address: str) -> None:
        self._bus = bus
        self._address = address
        self._closed = False
        self._reconnecting = asyncio.Lock()
        self._jobs: dict[str, asyncio.Future[str]] = {}
        # JobRemoved can overtake the reply to StartUnit; results that arrive while a
        # job-creating call is in flight wait here for their caller.
        self._early_results: dict[str, str] = {}
        self._calls_in_flight = 0
        self._call_slots = asyncio.Semaphore(MAX_CALLS_IN_FLIGHT)
        self._background: set[asyncio.Future] = set()

    @classmethod
    async def connect(cls, bus: str, *args: Any) -> Any:
        """`bus` is "system", "user" ($DBUS_SESSION_BUS_ADDRESS) or an address like unix:path=..."""
        self = cls(await _open(bus), bus, *args)
        await self._attach()
        return self

    async def _attach(self) -> None:
        """Ask for our signals on the current connection and watch it for its end."""
        bus = self._bus
        bus._writer.sock = _EagainSafeSocket(bus._writer.sock)
        # From the next message on; the one being read now (if any) is read whole.
        bus._create_unmarshaller = lambda: _SkippingUnmarshaller(
            bus._stream, bus._sock if bus._negotiate_unix_fd else None, self._wants_signal
        )
        bus.add_message_handler(self._on_message)
        try:
            for rule in (JOB_REMOVED_RULE, *self.MATCH_RULES):
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
            bus.disconnect()
            raise
        self._spawn(self._reconnect_when_lost(bus))

    async def _reconnect_when_lost(self, bus: MessageBus) -> None:
        with contextlib.suppress(Exception):  # how it ended does not matter to the waiters
            # Shielded: cancelling this watcher must not cancel the bus's own future.
            await asyncio.shield(bus.wait_for_disconnect())
        self._fail_jobs("the connection to systemd was lost")
        for attempt in itertools.count():
            if self._closed or self._bus is not bus:
                return
            try:
                await self._reconnect()
                return
            except SystemdError as error:
                pause = RECONNECT_PAUSES[min(attempt, len(RECONNECT_PAUSES) - 1)]
                log.warning("systemd's bus is away (%s); trying again in %.1fs", error, pause)
                await asyncio.sleep(pause)

    async def _reconnect(self) -> None:
        async with self._reconnecting:
            if self._closed:
                raise SystemdError("fleetpy.Disconnected", "the connection to systemd is closed")
            if self._bus.connected:
                return
            self._bus = await _open(self._address)
            await self._attach()
            log.warning("connected to systemd's bus again")
        self._resubscribed()

    def _resubscribed(self) -> None:
        """Signals were missed while the connection was down: for subclasses to catch up."""

    def _wants_signal(self, path: str | None, member: str | None) -> bool:
        """Whether a message's body is read; subclasses leave the signals they ignore unread."""
        return True

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        self._closed = True
        for task in self._background:
            task.cancel()
        self._fail_jobs("connection to systemd closed")
        self._bus.disconnect()
        with contextlib.suppress(Exception):  # how the connection ended no longer matters
            await self._bus.wait_for_disconnect()

    def _fail_jobs(self, why: str) -> None:
        for job in self._jobs.values():
            if not job.done():
                job.set_exception(SystemdError("fleetpy.Disconnected", why))
        self._jobs.clear()

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
        return (await self.unit_states([name]))[name]

    async def unit_states(self, names: list[str]) -> dict[str, tuple[str, str, str]]:
        """(LoadState, ActiveState, SubState) of each unit, in one call however many there are.

        ListUnitsByNames also answers for units linked but never started, and its reply is a
        few strings per unit where GetAll would bring some eighty properties to unmarshal.
        """
        if not names:
            return {}
        reply = await self._manager("ListUnitsByNames", "as", [list(names)])
        return {row[0]: (row[2], row[3], row[4]) for row in reply[0]}

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
        message = Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body,
        )
        if not self._bus.connected:
            # dbus-next would queue the call on a dead connection and never answer.
            await self._reconnect()
        async with self._call_slots:
            if not self._bus.connected:
                raise SystemdError("fleetpy.Disconnected", "the connection to systemd was lost")
            try:
                with metrics.DBUS_SECONDS.time(member):
                    reply = await self._bus.call(message)
            except Exception as error:  # the connection broke under this call
                metrics.DBUS_ERRORS.inc(member)
                self._fail_jobs(f"the connection to systemd broke: {error!r}")
                raise SystemdError(
                    "fleetpy.Disconnected", f"the connection to systemd broke: {error!r}"
                ) from error
        if reply.message_type == MessageType.ERROR:
            metrics.DBUS_ERRORS.inc(member)
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
