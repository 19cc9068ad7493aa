"""GET /fleetpy/v1/events: the cluster's recent events, filtered, and followed as they happen."""

from __future__ import annotations

import json

from aiohttp import web

from fleetpy.api.changes import Changes
from fleetpy.api.errors import ApiError
from fleetpy.registry import Event, Registry

DEFAULT_LIMIT = 100
# A followed stream says something at least this often, so a vanished client is noticed.
KEEPALIVE = 15.0


def matching(events: list[Event], unit: str | None, machine: str | None) -> list[Event]:
    """Events about `unit` and/or about a machine whose id starts with `machine`."""
    return [
        e
        for e in events
        if (not unit or e.unit == unit) and (not machine or e.machine_id.startswith(machine))
    ]


class EventsV1:
    def __init__(self, registry: Registry, changes: Changes):
        self.registry = registry
        self.changes = changes

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/fleetpy/v1/events", self.events, name="events")

    async def events(self, request: web.Request) -> web.StreamResponse:
        """?unit=NAME&machineID=PREFIX&limit=N (newest N, default 100)&follow=true (NDJSON)."""
        unit, machine = request.query.get("unit"), request.query.get("machineID")
        try:
            limit = int(request.query.get("limit", str(DEFAULT_LIMIT)))
        except ValueError:
            limit = -1
        if limit < 0:
            raise ApiError(400, "limit must be a whole number of 0 or more")
        follow = request.query.get("follow", "false").lower() in ("1", "true", "yes")
        everything = await self.registry.events()
        found = matching(everything, unit, machine)
        recent = found[-limit:] if limit else []
        if not follow:
            return web.json_response({"events": [e.to_json() for e in recent]})
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for event in recent:
            await response.write(_line(event))
        seen = _newest({}, everything)
        # The first look comes soon: the shared watch may have started only now.
        version, timeout = self.changes.version, 0.5
        while True:
            version = await self.changes.wait(version, timeout)
            timeout = KEEPALIVE
            events = await self.registry.events()
            fresh = [e for e in events if e.seq > seen.get(e.reporter, 0)]
            seen = _newest(seen, events)
            lines = [_line(e) for e in matching(fresh, unit, machine)]
            await response.write(b"".join(lines) or b"\n")


def _newest(seen: dict[str, int], events: list[Event]) -> dict[str, int]:
    """`seen` (each reporter's newest sequence number) updated with `events`."""
    seen = dict(seen)
    for event in events:
        seen[event.reporter] = max(seen.get(event.reporter, 0), event.seq)
    return seen


def _line(event: Event) -> bytes:
    return json.dumps(event.to_json()).encode() + b"\n"
