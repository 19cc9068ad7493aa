"""The web dashboard: machines, units and events, server-rendered, updated live by server-sent events.

Read-only and behind the API's own auth (a browser logs in once at /ui/login with the API token,
kept as a cookie). jinja2 is imported on the first page view, so a fleetd nobody looks at does not
carry it; the page has one small script and no build step, and works offline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp import web

from fleetpy.api.auth import AUTH, LOGIN_PATH, TOKEN_COOKIE
from fleetpy.api.changes import Changes
from fleetpy.api.context import ApiContext, unit_name
from fleetpy.engine.explain import explain_placement
from fleetpy.registry import UnitState

STATIC = Path(__file__).resolve().parent.parent / "templates" / "dashboard"
EVENTS_SHOWN = 50
KEEPALIVE = 15.0


async def snapshot(context: ApiContext) -> dict[str, Any]:
    """What the dashboard shows, as JSON: machines with their units, units with state and health."""
    registry = context.registry
    machines = await registry.machines()
    jobs, assignments, states, pending = (
        await registry.jobs(),
        await registry.assignments(),
        await registry.states(),
        await registry.pending(),
    )
    alive = {m.id for m in machines}
    state_of = {(s.unit, s.machine_id): s for s in states}
    units = []
    for job in jobs:
        placed = [a.machine_id for a in assignments if a.unit == job.name and a.machine_id in alive]
        for machine_id in placed or [""]:
            state = state_of.get((job.name, machine_id))
            active = state.active_state if state else ""
            reason = pending.get(job.name) or (state.reason if state is not None and state.reason else "")
            units.append(
                {
                    "name": job.name,
                    "desiredState": job.desired_state,
                    "machineID": machine_id,
                    "activeState": active or "-",
                    "subState": state.sub_state if state else "-",
                    "health": _health(job.desired_state, active, bool(pending.get(job.name)), state),
                    "reason": reason,
                }
            )
    by_machine: dict[str, list[str]] = {}
    for unit in units:
        by_machine.setdefault(unit["machineID"], []).append(unit["name"])
    events = (await registry.events())[-EVENTS_SHOWN:]
    return {
        "machines": [
            {
                "id": m.id,
                "primaryIP": m.public_ip,
                "metadata": dict(m.metadata),
                "units": sorted(by_machine.get(m.id, [])),
            }
            for m in machines
        ],
        "units": units,
        "events": [e.to_json() for e in reversed(events)],
    }


def _health(desired: str, active: str, pending: bool, state: UnitState | None) -> str:
    if pending:
        return "pending"
    if active == "failed":
        return "failed"
    if desired == "launched" and active == "active" and state is not None and state.health is not None:
        return state.health.status  # what the unit's own [X-Fleet] health check found
    if desired == "launched":
        return "healthy" if active == "active" else "starting"
    return "healthy" if active in ("inactive", "") else "stopping"


class Dashboard:
    def __init__(self, context: ApiContext, changes: Changes):
        self.context = context
        self.changes = changes
        self._templates: Any = None

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/ui", self.page)
        router.add_get("/ui/", self.page)
        router.add_get("/ui/stream", self.stream, name="dashboard-stream")
        router.add_get("/ui/units/{name}", self.unit)
        router.add_get(LOGIN_PATH, self.login_form)
        router.add_post(LOGIN_PATH, self.login)
        router.add_static("/ui/static", STATIC)

    def render(self, template: str, **values: Any) -> web.Response:
        if self._templates is None:
            import jinja2

            self._templates = jinja2.Environment(
                loader=jinja2.FileSystemLoader(STATIC), autoescape=True, undefined=jinja2.StrictUndefined
            )
        html = self._templates.get_template(template).render(**values)
        return web.Response(text=html, content_type="text/html")

    async def page(self, _request: web.Request) -> web.Response:
        data = await snapshot(self.context)
        return self.render("index.html.j2", data=data, initial=json.dumps(data))

    async def unit(self, request: web.Request) -> web.Response:
        name = unit_name(request).full
        await self.context.existing_job(name)
        registry = self.context.registry
        units = await self.context.all_units()
        machines, current = await registry.machines(), await registry.assignments()
        pending, volumes, avoided = (
            await registry.pending(),
            await registry.volumes(),
            await registry.avoided(),
        )
        lines = explain_placement(name, machines, units, current, pending, volumes, avoided)
        events = [e.to_json() for e in await registry.events() if e.unit == name]
        return self.render("unit.html.j2", name=name, lines=lines, events=list(reversed(events)))

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: a `snapshot` whenever the registry changed."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        version = -1
        while True:
            seen, version = version, await self.changes.wait(version, KEEPALIVE)
            if version == seen and seen >= 0:
                await response.write(b": keep-alive\n\n")
                continue
            data = json.dumps(await snapshot(self.context))
            await response.write(f"event: snapshot\ndata: {data}\n\n".encode())

    async def login_form(self, _request: web.Request) -> web.Response:
        return self.render("login.html.j2", failed=False)

    async def login(self, request: web.Request) -> web.Response:
        token = (await request.post()).get("token", "")
        expected = request.app[AUTH].token
        if expected is None or not isinstance(token, str) or token.strip() != expected:
            response = self.render("login.html.j2", failed=True)
            response.set_status(401)
            return response
        moved = web.HTTPSeeOther("/ui")
        moved.set_cookie(TOKEN_COOKIE, expected, httponly=True, samesite="Strict", path="/")
        raise moved
