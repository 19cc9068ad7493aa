"""The API application: fleet's /fleet/v1 routes plus fleetpy's /fleetpy/v1 extensions."""

from __future__ import annotations

import ssl
from pathlib import Path

from aiohttp import web

from fleetpy.api.auth import AUTH, Auth, authenticate
from fleetpy.api.changes import Changes
from fleetpy.api.connections import GUARDS, LIMITS, OUTAGE, Guards, Limits, bounded, clock
from fleetpy.api.context import ApiContext
from fleetpy.api.dashboard import Dashboard
from fleetpy.api.errors import errors
from fleetpy.api.events import EventsV1
from fleetpy.api.extensions import FleetpyV1
from fleetpy.api.fleet_v1 import FleetV1
from fleetpy.api.local import LocalUnitInfo
from fleetpy.api.metrics import MetricsRoute
from fleetpy.api.peer import Peers
from fleetpy.api.wait import UnitWait
from fleetpy.registry import Registry
from fleetpy.registry.mirror import Mirror, MirrorStore

MAX_BODY = 1 << 20


def create_app(
    registry: Registry,
    *,
    machine_id: str,
    local: LocalUnitInfo | None = None,
    peer_token: str | None = None,
    peer_tls: ssl.SSLContext | None = None,
    cached: bool = False,
    volume_dir: Path | None = None,
) -> web.Application:
    """The API application; `serve` puts it on fleetd's sockets.

    `cached`: units, states and machines are read from a watch-fed copy of the registry that
    the first request starts, so a storm of GETs costs etcd nothing, and a request's own
    writes return once the copy holds them (`fleetctl start` then `list-units` shows the new
    unit). `volume_dir` is where this machine's local volumes are, for serving one that moves
    away. Events are still read from etcd: each fleetd rewrites its own whole record often,
    and only their routes read them.
    """
    app = web.Application(middlewares=[clock, errors, authenticate, bounded], client_max_size=MAX_BODY)
    reads = registry
    if cached:
        mirror = Mirror(registry.store, registry.prefix, skip=("events",))
        reads = Registry(MirrorStore(mirror, start=True), registry.prefix)
        app.on_cleanup.append(mirror.close)
    context = ApiContext(reads, machine_id)
    app[AUTH] = Auth(machine_id=machine_id)
    app[GUARDS] = Guards()
    app[LIMITS] = Limits()
    app[OUTAGE] = registry.outage
    FleetV1(context).add_routes(app.router)
    extensions = FleetpyV1(context, local, Peers(registry, machine_id, peer_token, peer_tls), volume_dir)
    extensions.add_routes(app.router)
    UnitWait(context).add_routes(app.router)
    app.on_shutdown.append(extensions.stop_followers)
    changes = Changes(registry)
    app.on_cleanup.append(changes.close)
    EventsV1(registry, changes).add_routes(app.router)
    MetricsRoute(registry).add_routes(app.router)
    Dashboard(context, changes).add_routes(app.router)
    return app
