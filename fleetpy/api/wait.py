"""GET /fleetpy/v1/wait: a long poll until units reach a state.

Blocking fleetctl commands used to ask about every unit every 0.2 s; now they ask once, and
fleetd answers when an etcd watch on the agents' states says the units got there (or after
`timeout` seconds, with how far they got). The answer carries the units' entities and the
reasons agents published for units that failed or cannot load.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from fleetpy.api.connections import LIMITS
from fleetpy.api.context import ApiContext
from fleetpy.api.errors import ApiError
from fleetpy.registry import HistoryLost
from fleetpy.unit import UnitError, validate_unit_name

STATES = ("inactive", "loaded", "launched")
# Kept under the registry deadline (`bounded`), which ends any request that waits longer.
DEADLINE_SHARE = 0.8


class UnitWait:
    """The wait route's handler."""

    def __init__(self, context: ApiContext):
        self.context = context
        self.registry = context.registry

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/fleetpy/v1/wait", self.wait)

    async def wait(self, request: web.Request) -> web.Response:
        names, target, timeout = _query(request)
        timeout = min(timeout, request.app[LIMITS].registry_deadline * DEADLINE_SHARE)
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout
        while True:
            index = await self.registry.index()
            answer = await self._progress(names, target)
            left = until - loop.time()
            if answer["done"] or left <= 0:
                return web.json_response(answer)
            # Units reach a state when their agent publishes it: wake on the next state write.
            with contextlib.suppress(HistoryLost):
                await self.registry.wait(index, "state", timeout=left)

    async def _progress(self, names: list[str], target: str) -> dict:
        wanted = set(names)
        jobs = [job for job in await self.registry.jobs() if job.name in wanted]
        units = await self.context.entities(jobs)
        failed = {s.unit: s.reason for s in await self.registry.states() if s.unit in wanted and s.reason}
        found = {unit["name"] for unit in units}
        done = not (wanted - found) and all(u["currentState"] == target or u["name"] in failed for u in units)
        return {"units": units, "failed": failed, "missing": sorted(wanted - found), "done": done}


def _query(request: web.Request) -> tuple[list[str], str, float]:
    names = request.query.getall("unit", [])
    if not names:
        raise ApiError(400, "name the units to wait for: /fleetpy/v1/wait?unit=NAME&state=STATE")
    for name in names:
        try:
            validate_unit_name(name)
        except UnitError as error:
            raise ApiError(400, str(error)) from None
    target = request.query.get("state", "")
    if target not in STATES:
        raise ApiError(400, f"state={target!r} is not a unit state; use one of {', '.join(STATES)}")
    try:
        timeout = float(request.query.get("timeout", "0"))
    except ValueError:
        timeout = -1.0
    if not 0 <= timeout < float("inf"):
        raise ApiError(400, f"timeout={request.query.get('timeout')!r} is not a number of seconds >= 0")
    return list(dict.fromkeys(names)), target, timeout
