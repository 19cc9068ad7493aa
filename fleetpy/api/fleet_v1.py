"""fleet's /fleet/v1 routes: units, unit states and machines, with fleet's semantics and paging."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from fleetpy.api.context import ApiContext, json_body, unit_name
from fleetpy.api.errors import ApiError
from fleetpy.api.openapi import serve_document
from fleetpy.api.views import machine_entity
from fleetpy.registry import DESIRED_STATES, Job
from fleetpy.unit import UnitFile, UnitName, load_unit

log = logging.getLogger(__name__)

Handler = Callable[[Any, web.Request], Awaitable[web.Response]]

PAGE_SIZE = 100
_PATCH_PATH = re.compile(r"/([^/]+)/metadata/([^/]+)")


def _encode_token(after: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": after}).encode()).decode()


def _page(items: list[tuple[str, Any]], request: web.Request) -> tuple[list[Any], str | None]:
    """One page of (sort key, item) pairs after the request's nextPageToken."""
    token = request.query.get("nextPageToken")
    after = None
    if token is not None:
        try:
            after = json.loads(base64.urlsafe_b64decode(token.encode()))["after"]
        except (ValueError, KeyError, TypeError, RecursionError, binascii.Error):
            after = None
        if not isinstance(after, str):
            # Only tokens this API handed out are valid; one of another shape is the client's error.
            raise ApiError(400, "invalid value of nextPageToken query parameter")
    ordered = sorted((pair for pair in items if after is None or pair[0] > after), key=lambda pair: pair[0])
    page = ordered[:PAGE_SIZE]
    more = len(ordered) > PAGE_SIZE
    return [item for _, item in page], _encode_token(page[-1][0]) if more else None


def _parse_patch(body: Any) -> list[tuple[str, str, str, str | None]]:
    """Validate a whole JSON Patch before any of it is applied."""
    if not isinstance(body, list):
        raise ApiError(400, "request body must be a JSON Patch list of operations")
    operations = []
    for index, item in enumerate(body):
        if not isinstance(item, dict):
            raise ApiError(400, f"operation {index} must be an object with op, path and value")
        op, path = item.get("op"), item.get("path")
        if op not in ("add", "remove", "replace"):
            raise ApiError(400, f"operation {index}: op must be add, remove or replace, not {op!r}")
        match = _PATCH_PATH.fullmatch(path) if isinstance(path, str) else None
        if match is None:
            raise ApiError(
                400, f"operation {index}: path must look like /<machine id>/metadata/<key>, not {path!r}"
            )
        value = item.get("value")
        if isinstance(value, dict) and isinstance(value.get("value"), str):
            value = value["value"]  # the shape fleet's own server reads, so its clients work too
        if op != "remove" and not isinstance(value, str):
            raise ApiError(400, f"operation {index}: {op} needs a string value")
        operations.append((op, match.group(1), match.group(2), value))
    return operations


def runs_to_completion(handler: Handler) -> Handler:
    """Lets a registry change finish even if its request is cancelled (client gone, deadline passed).

    A half-made change, such as a replaced unit deleted but not yet created again, is worse
    than a late one.
    """

    @functools.wraps(handler)
    async def shielded(self: FleetV1, request: web.Request) -> web.Response:
        task = asyncio.ensure_future(handler(self, request))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_unawaited_failure)
            raise

    return shielded


def _unawaited_failure(task: asyncio.Future) -> None:
    # The request is gone, so nobody else hears how the change ended; a failure goes to the log.
    if not task.cancelled() and (error := task.exception()) is not None:
        log.warning("API change failed after its request ended: %s", error)


class FleetV1:
    """The handlers of fleet's own API."""

    def __init__(self, context: ApiContext):
        self.context = context
        self.registry = context.registry

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/fleet/v1/discovery", self.discovery)
        router.add_get("/fleet/v1/openapi.json", serve_document)
        router.add_get("/fleet/v1/units", self.list_units)
        router.add_get("/fleet/v1/units/{name}", self.get_unit)
        router.add_put("/fleet/v1/units/{name}", self.put_unit)
        router.add_delete("/fleet/v1/units/{name}", self.delete_unit)
        router.add_get("/fleet/v1/state", self.list_states)
        router.add_get("/fleet/v1/state/{name}", self.get_state)
        router.add_get("/fleet/v1/machines", self.list_machines)
        router.add_patch("/fleet/v1/machines", self.patch_machines)

    async def discovery(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "kind": "discovery#restDescription",
                "name": "fleet",
                "version": "v1",
                "servicePath": "fleet/v1/",
                "resources": {
                    "Units": ["List", "Get", "Set", "Delete"],
                    "UnitState": ["List", "Get"],
                    "Machines": ["List", "Patch"],
                },
            }
        )

    async def list_units(self, request: web.Request) -> web.Response:
        jobs = await self.registry.jobs()
        page, token = _page([(job.name, job) for job in jobs], request)
        body: dict[str, Any] = {"units": await self.context.entities(page)}
        if token:
            body["nextPageToken"] = token
        return web.json_response(body)

    async def get_unit(self, request: web.Request) -> web.Response:
        name = unit_name(request).full
        job = await self.context.existing_job(name)
        return web.json_response((await self.context.entities([job]))[0])

    @runs_to_completion
    async def put_unit(self, request: web.Request) -> web.Response:
        """Create, replace or set the desired state of a unit, with fleet's semantics.

        Go fleetctl creates units without a desiredState (fleet then makes them inactive),
        and its --replace sends new options for an existing unit, which fleet takes as a
        replacement of the unit rather than a conflict.
        """
        name = unit_name(request)
        body = await json_body(request)
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object with desiredState and options")
        if body.get("name") not in (None, "", name.full):
            raise ApiError(400, f"name {body['name']!r} in the body does not match {name.full} in the URL")
        # Go's JSON encoding omits an empty desiredState, so absent and "" mean the same.
        desired = body.get("desiredState") or None
        if desired is not None and desired not in DESIRED_STATES:
            raise ApiError(400, f"desiredState must be one of {', '.join(DESIRED_STATES)}, not {desired!r}")
        if name.is_template and desired not in (None, "inactive"):
            raise ApiError(
                400,
                f"{name.full} is a template; templates can only be submitted, "
                f"start an instance such as {name.prefix}@1.{name.suffix}",
            )
        options = body.get("options")
        unit_file = UnitFile.from_options(options) if options else None
        job = await self.registry.job(name.full)
        if job is not None and (unit_file is None or unit_file.hash == job.hash):
            if desired is None:
                raise ApiError(409, f"unit {name.full} already exists; updating it needs a desiredState")
            await self.registry.set_desired_state(name.full, desired)
            return web.Response(status=204)
        if unit_file is None:
            unit_file = await self.new_unit_file(name)
        load_unit(name.full, unit_file)  # validates the name with the file and its [X-Fleet]
        # One transaction on etcd v3; other content replaces the job, as in fleet.
        await self.registry.submit(
            unit_file, Job(name.full, unit_file.hash, desired or "inactive"), replace=job is not None
        )
        return web.Response(status=201)

    async def new_unit_file(self, name: UnitName) -> UnitFile:
        """The file of a unit created without options, which only an instance can be."""
        if name.is_instance:
            # As fleetctl does: an instance without options takes its template's file.
            template = await self.registry.job(name.template)
            stored = await self.context.stored(template) if template is not None else None
            if stored is not None and stored.file is not None:
                return stored.file
            raise ApiError(
                409,
                f"unit {name.full} does not exist and no options were given, "
                f"and its template {name.template} is not submitted",
            )
        raise ApiError(409, f"unit {name.full} does not exist; creating it needs options")

    @runs_to_completion
    async def delete_unit(self, request: web.Request) -> web.Response:
        # The unit file stays: other units with the same content share it by hash.
        await self.registry.delete_job(unit_name(request).full)
        return web.Response(status=204)

    async def list_states(self, request: web.Request) -> web.Response:
        alive = {m.id for m in await self.registry.machines()}
        machine_id = request.query.get("machineID")
        name = request.query.get("unitName")
        if name is not None:
            UnitName.parse(name)
        states = [
            s
            for s in await self.registry.states()
            if s.machine_id in alive and machine_id in (None, s.machine_id) and name in (None, s.unit)
        ]
        page, token = _page([(f"{s.unit} {s.machine_id}", s) for s in states], request)
        body: dict[str, Any] = {"states": [s.to_json() for s in page]}
        if token:
            body["nextPageToken"] = token
        return web.json_response(body)

    async def get_state(self, request: web.Request) -> web.Response:
        """One machine's state of a unit; Go fleetctl start polls it until systemd says active."""
        name = unit_name(request).full
        alive = {m.id for m in await self.registry.machines()}
        states = sorted(
            (s for s in await self.registry.states() if s.unit == name and s.machine_id in alive),
            key=lambda s: s.machine_id,
        )
        if not states:
            raise ApiError(404, f"unit {name} has no state on any live machine")
        return web.json_response(states[0].to_json())

    async def list_machines(self, request: web.Request) -> web.Response:
        machines = await self.registry.machines()
        page, token = _page([(m.id, m) for m in machines], request)
        body: dict[str, Any] = {"machines": [machine_entity(m) for m in page]}
        if token:
            body["nextPageToken"] = token
        return web.json_response(body)

    @runs_to_completion
    async def patch_machines(self, request: web.Request) -> web.Response:
        operations = _parse_patch(await json_body(request))
        alive = {m.id for m in await self.registry.machines()}
        edits: dict[str, dict[str, str | None]] = {}
        for op, machine_id, key, value in operations:
            if machine_id not in alive:
                raise ApiError(404, f"machine {machine_id} not found; see 'fleetctl list-machines -l'")
            edits.setdefault(machine_id, {})[key] = None if op == "remove" else value
        for machine_id, changes in edits.items():
            await self.registry.edit_machine_metadata(machine_id, changes)
        return web.Response(status=204)
