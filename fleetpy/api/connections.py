"""Bounds on what one client can hold: open connections per listener and time to send a request.

aiohttp waits forever for a request's headers and accepts as many connections as the process has
file descriptors, so a crowd of slow TCP clients used to take every descriptor and with them the
unix socket too. Each listener gets a `ConnectionGuard`: past its limit a new connection is
closed at once, and a connection that has not sent a complete request head within
`header_timeout` (at its start, or since its last response) is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from fleetpy.api.errors import ETCD_UNREACHABLE, ApiError, etcd_unavailable
from fleetpy.registry import NoQuorum, Unavailable

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Limits:
    """How much of fleetd API clients may hold; the unix socket's share is its own."""

    tcp_connections: int = 1024
    unix_connections: int = 128
    # Time to send a request's head, from connecting or from the last response.
    header_timeout: float = 10.0
    # Time to send a request's body once its head arrived.
    body_timeout: float = 30.0
    # Time a request may wait for etcd. Well under fleetctl's 10 s request timeout, so that
    # during an etcd outage the client hears fleetd's 503 instead of timing out itself.
    registry_deadline: float = 5.0
    # Time running requests get to finish when fleetd stops (aiohttp may wait it twice);
    # followed journals are cut at once.
    shutdown_timeout: float = 0.5


LIMITS = web.AppKey("limits", Limits)
# Why etcd fails now, as fleetd's registry knows it (Registry.outage): what a request that waited
# out its deadline is told.
OUTAGE: web.AppKey[Callable[[], Unavailable | None]] = web.AppKey("outage")


class _GuardedProtocol(asyncio.Protocol):
    """Passes everything to aiohttp's request handler, and counts and times the connection."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol):
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.BaseTransport | None = None
        self.accepted = False
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self.guard.open >= self.guard.limit:
            self.guard.refused += 1
            transport.abort()  # type: ignore[attr-defined]
            return
        self.accepted = True
        self.guard.open += 1
        self.guard.by_handler[self.inner] = self
        self.arm()
        self.inner.connection_made(transport)

    def arm(self) -> None:
        self.disarm()
        self.deadline = asyncio.get_running_loop().call_later(self.guard.header_timeout, self.too_slow)

    def disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def too_slow(self) -> None:
        self.guard.timed_out += 1
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.accepted:
            return
        self.accepted = False
        self.disarm()
        self.guard.open -= 1
        self.guard.by_handler.pop(self.inner, None)
        self.inner.connection_lost(exc)


class ConnectionGuard:
    """The connection limit and request-head deadline of one listener (TCP or the unix socket)."""

    def __init__(self, limit: int, header_timeout: float):
        self.limit = limit
        self.header_timeout = header_timeout
        self.open = 0
        self.refused = 0
        self.timed_out = 0
        self.by_handler: dict[Any, _GuardedProtocol] = {}

    def factory(self, make_handler: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _GuardedProtocol(self, make_handler())


class Guards:
    """Every listener's guard, so a request can stop or restart its connection's clock."""

    def __init__(self) -> None:
        self.all: list[ConnectionGuard] = []

    def _of(self, request: web.BaseRequest) -> _GuardedProtocol | None:
        for guard in self.all:
            if (guarded := guard.by_handler.get(request.protocol)) is not None:
                return guarded
        return None

    def request_started(self, request: web.BaseRequest) -> None:
        if (guarded := self._of(request)) is not None:
            guarded.disarm()

    def request_done(self, request: web.BaseRequest) -> None:
        # A kept-alive connection gets the same time again to send its next request.
        if (guarded := self._of(request)) is not None and guarded.transport is not None:
            guarded.arm()


GUARDS = web.AppKey("guards", Guards)


@web.middleware
async def clock(request: web.Request, handler: Any) -> web.StreamResponse:
    """Stops the connection's request-head clock while its handler runs."""
    guards = request.app[GUARDS]
    guards.request_started(request)
    try:
        return await handler(request)
    finally:
        guards.request_done(request)


# Routes that stream or ask another machine; they bound their own registry part (see `deadline`).
UNBOUNDED_ROUTES = frozenset({"status", "journal", "events", "dashboard-stream", "volume-data"})


@web.middleware
async def bounded(request: web.Request, handler: Any) -> web.StreamResponse:
    """Answers 503 once a request has waited `registry_deadline` (for etcd, in practice)."""
    if request.match_info.route.name in UNBOUNDED_ROUTES:
        return await handler(request)
    async with deadline(request):
        return await handler(request)


@contextlib.asynccontextmanager
async def deadline(request: web.BaseRequest) -> AsyncIterator[None]:
    seconds = request.app[LIMITS].registry_deadline
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        pending = "" if request.method == "GET" else "; your change is still being tried and may yet be made"
        outage = request.app[OUTAGE]()
        if isinstance(outage, NoQuorum):
            message = etcd_unavailable(outage) + pending
        else:
            message = (
                f"etcd did not answer within {seconds:g}s: it is down or unreachable from this fleetd, "
                f"which keeps retrying; check that etcd runs and that --etcd-servers points at it{pending}"
            )
        raise ApiError(503, message, reason=ETCD_UNREACHABLE) from None


class GuardedSite(web.BaseSite):
    """An aiohttp site whose connections go through a `ConnectionGuard`."""

    def __init__(
        self,
        runner: web.BaseRunner,
        guard: ConnectionGuard,
        listen: Callable[[Callable[[], asyncio.Protocol]], Any],
        name: str,
    ):
        super().__init__(runner)
        self.guard = guard
        self._listen = listen
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        assert self._runner.server is not None
        self._server = await self._listen(self.guard.factory(self._runner.server))


class AcceptErrorLog:
    """The event loop's exception handler, logging accept() failures at most once per `interval`.

    Out of descriptors, asyncio retries accept() every second per listener and reports every
    failure; without this, a flood of clients also fills the disk with the same line.
    """

    def __init__(self, interval: float = 10.0, now: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.now = now
        self.last = -interval
        self.suppressed = 0
        self.previous: Any = None

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not str(context.get("message", "")).startswith("socket.accept()"):
            if self.previous is not None:
                self.previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        if self.now() - self.last < self.interval:
            self.suppressed += 1
            return
        more = f" ({self.suppressed} more since the last report)" if self.suppressed else ""
        log.error("API cannot accept connections: %s%s", context.get("exception"), more)
        self.last = self.now()
        self.suppressed = 0

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self.previous = loop.get_exception_handler()
        loop.set_exception_handler(self)
