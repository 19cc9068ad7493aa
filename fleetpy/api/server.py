"""fleetd's HTTP/JSON API: fleet's /fleet/v1 routes plus fleetpy's /fleetpy/v1 extensions.

Errors are mapped to HTTP status codes here, once: unit errors are 400, missing records 404,
conflicts 409, an unreachable etcd 503; every error body is {"error": {"code", "message"}}.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import re
import socket
import ssl
import stat
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

from fleetpy.api.local import LocalUnitInfo
from fleetpy.api.views import machine_entity, unit_entity
from fleetpy.engine.engine import ParsedUnits, explain_placement
from fleetpy.registry import DESIRED_STATES, Conflict, Job, NotFound, Unavailable
from fleetpy.registry.aio import AsyncRegistry
from fleetpy.unit import UnitError, UnitFile, UnitName, load_unit

log = logging.getLogger(__name__)

PAGE_SIZE = 100
MAX_BODY = 1 << 20
# A machine record written by a metadata edit lives this long unless its agent refreshes it,
# as the agent does every few seconds while alive.
METADATA_EDIT_TTL = 30.0
# Marks a request one fleetd passed to another, so a stale schedule cannot bounce it around.
FORWARDED_HEADER = "X-Fleetpy-Forwarded"
_PATCH_PATH = re.compile(r"/([^/]+)/metadata/([^/]+)")


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclasses.dataclass
class _Auth:
    """The bearer token TCP clients must present; set by `serve`, None on the unix socket only."""

    token: str | None = None


_AUTH = web.AppKey("auth", _Auth)


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"code": status, "message": message}}, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        return error_response(error.status, error.message)
    except UnitError as error:
        return error_response(400, str(error))
    except NotFound as error:
        return error_response(404, str(error))
    except Conflict as error:
        return error_response(409, str(error))
    except Unavailable as error:
        return error_response(503, str(error))
    except web.HTTPException as error:
        if error.status < 400:
            raise
        messages = {
            404: f"no such API path {request.path}",
            405: f"method {request.method} is not allowed on {request.path}",
        }
        return error_response(error.status, messages.get(error.status, error.text or error.reason))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        # The traceback goes to fleetd's log; clients only learn that something broke.
        log.exception("API request %s %s failed", request.method, request.path)
        return error_response(500, "internal error in fleetd; see its log for details")


@web.middleware
async def _authenticate(request: web.Request, handler: Any) -> web.StreamResponse:
    token = request.app[_AUTH].token
    sock = request.transport.get_extra_info("socket") if request.transport else None
    over_unix = sock is not None and sock.family == socket.AF_UNIX
    if token is not None and not over_unix:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ApiError(
                401,
                "missing or wrong API token; pass it as 'Authorization: Bearer "
                "TOKEN' (fleetctl --token or FLEETCTL_TOKEN)",
            )
    return await handler(request)


def _encode_token(after: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": after}).encode()).decode()


def _page(items: list[tuple[str, Any]], request: web.Request) -> tuple[list[Any], str | None]:
    """One page of (sort key, item) pairs after the request's nextPageToken."""
    token = request.query.get("nextPageToken")
    after = None
    if token is not None:
        try:
            after = json.loads(base64.urlsafe_b64decode(token.encode()))["after"]
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise ApiError(400, "invalid value of nextPageToken query parameter") from None
    ordered = sorted((pair for pair in items if after is None or pair[0] > after), key=lambda pair: pair[0])
    page = ordered[:PAGE_SIZE]
    more = len(ordered) > PAGE_SIZE
    return [item for _, item in page], _encode_token(page[-1][0]) if more else None


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()  # raises 413 beyond client_max_size
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, f"request body is not valid JSON: {error}") from None


def _unit_name(request: web.Request) -> UnitName:
    return UnitName.parse(request.match_info["name"])


class _Api:
    """The route handlers, sharing the registry and a cache of immutable unit files."""

    def __init__(
        self, registry: AsyncRegistry, machine_id: str, local: LocalUnitInfo | None, peer_token: str | None
    ):
        self.registry = registry
        self.machine_id = machine_id
        self.local = local
        self.peer_token = peer_token
        # Unit files are content-addressed, so an entry never goes stale.
        self._files: dict[str, UnitFile] = {}
        self._global: dict[tuple[str, str], bool] = {}
        self.units = ParsedUnits(registry)

    async def unit_file(self, digest: str) -> UnitFile | None:
        if digest not in self._files:
            found = await self.registry.unit_file(digest)
            if found is None:
                return None
            self._files[digest] = found
        return self._files[digest]

    def is_global(self, name: str, digest: str, unit_file: UnitFile | None) -> bool:
        if unit_file is None:
            return False
        if (name, digest) not in self._global:
            try:
                self._global[(name, digest)] = load_unit(name, unit_file).fleet.is_global
            except UnitError:
                self._global[(name, digest)] = False
        return self._global[(name, digest)]

    async def entities(self, jobs: list[Job]) -> list[dict]:
        assignments = await self.registry.assignments()
        states = {(s.unit, s.machine_id): s for s in await self.registry.states()}
        alive = {m.id for m in await self.registry.machines()}
        result = []
        for job in jobs:
            unit_file = await self.unit_file(job.hash)
            result.append(
                unit_entity(
                    job, unit_file, self.is_global(job.name, job.hash, unit_file), assignments, states, alive
                )
            )
        return result

    async def existing_job(self, name: str) -> Job:
        job = await self.registry.job(name)
        if job is None:
            raise ApiError(404, f"unit {name} not found")
        return job

    # /fleet/v1
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
        body: dict[str, Any] = {"units": await self.entities(page)}
        if token:
            body["nextPageToken"] = token
        return web.json_response(body)

    async def get_unit(self, request: web.Request) -> web.Response:
        name = _unit_name(request).full
        job = await self.existing_job(name)
        return web.json_response((await self.entities([job]))[0])

    async def put_unit(self, request: web.Request) -> web.Response:
        """Create, replace or set the desired state of a unit, with fleet's semantics.

        Go fleetctl creates units without a desiredState (fleet then makes them inactive),
        and its --replace sends new options for an existing unit, which fleet takes as a
        replacement of the unit rather than a conflict.
        """
        name = _unit_name(request)
        body = await _json_body(request)
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
        digest = await self.registry.put_unit_file(unit_file)
        if job is not None:
            with contextlib.suppress(NotFound):  # destroyed meanwhile: create it all the same
                await self.registry.delete_job(name.full)
        await self.registry.create_job(Job(name.full, digest, desired or "inactive"))
        return web.Response(status=201)

    async def new_unit_file(self, name: UnitName) -> UnitFile:
        """The file of a unit created without options, which only an instance can be."""
        if name.is_instance:
            # As fleetctl does: an instance without options takes its template's file.
            template = await self.registry.job(name.template)
            if template is not None:
                found = await self.unit_file(template.hash)
                if found is not None:
                    return found
            raise ApiError(
                409,
                f"unit {name.full} does not exist and no options were given, "
                f"and its template {name.template} is not submitted",
            )
        raise ApiError(409, f"unit {name.full} does not exist; creating it needs options")

    async def delete_unit(self, request: web.Request) -> web.Response:
        # The unit file stays: other units with the same content share it by hash.
        await self.registry.delete_job(_unit_name(request).full)
        return web.Response(status=204)

    async def list_states(self, request: web.Request) -> web.Response:
        alive = {m.id for m in await self.registry.machines()}
        machine_id = request.query.get("machineID")
        unit_name = request.query.get("unitName")
        if unit_name is not None:
            UnitName.parse(unit_name)
        states = [
            s
            for s in await self.registry.states()
            if s.machine_id in alive and machine_id in (None, s.machine_id) and unit_name in (None, s.unit)
        ]
        page, token = _page([(f"{s.unit} {s.machine_id}", s) for s in states], request)
        body: dict[str, Any] = {"states": [s.to_json() for s in page]}
        if token:
            body["nextPageToken"] = token
        return web.json_response(body)

    async def get_state(self, request: web.Request) -> web.Response:
        """One machine's state of a unit; Go fleetctl start polls it until systemd says active."""
        name = _unit_name(request).full
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

    async def patch_machines(self, request: web.Request) -> web.Response:
        operations = _parse_patch(await _json_body(request))
        machines = {m.id: m for m in await self.registry.machines()}
        edited: dict[str, dict[str, str]] = {}
        for op, machine_id, key, value in operations:
            if machine_id not in machines:
                raise ApiError(404, f"machine {machine_id} not found; see 'fleetctl list-machines -l'")
            metadata = edited.setdefault(machine_id, dict(machines[machine_id].metadata))
            if op == "remove":
                metadata.pop(key, None)
            else:
                metadata[key] = value
        for machine_id, metadata in edited.items():
            old = machines[machine_id]
            await self.registry.replace_machine(
                old, dataclasses.replace(old, metadata=metadata), METADATA_EDIT_TTL
            )
        return web.Response(status=204)

    # /fleetpy/v1
    async def explain(self, request: web.Request) -> web.Response:
        name = _unit_name(request).full
        await self.existing_job(name)
        return web.json_response(
            {"name": name, "lines": await explain_placement(self.registry, self.units, name)}
        )

    async def pending(self, request: web.Request) -> web.Response:
        name = _unit_name(request).full
        await self.existing_job(name)
        reason = (await self.registry.pending()).get(name)
        return web.json_response({"name": name, "reason": reason})

    async def locate(self, request: web.Request, name: str) -> str:
        """The live machine running `name`; this one if it is among several."""
        await self.existing_job(name)
        alive = {m.id for m in await self.registry.machines()}
        where = [
            a.machine_id
            for a in await self.registry.assignments()
            if a.unit == name and a.machine_id in alive
        ]
        wanted = request.query.get("machineID")
        if wanted:
            if wanted not in where:
                raise ApiError(404, f"unit {name} is not scheduled on machine {wanted}")
            return wanted
        if not where:
            reason = (await self.registry.pending()).get(name)
            raise ApiError(
                404, f"unit {name} is not scheduled on any machine" + (f": {reason}" if reason else "")
            )
        return self.machine_id if self.machine_id in where else where[0]

    async def peer(self, request: web.Request, machine_id: str) -> str:
        """The API endpoint of another machine, after checking the request may go there."""
        if request.headers.get(FORWARDED_HEADER):
            raise ApiError(
                502,
                f"request was forwarded to {self.machine_id}, which does not run "
                "the unit; the schedule changed meanwhile, try again",
            )
        machine = next((m for m in await self.registry.machines() if m.id == machine_id), None)
        if machine is None:
            raise ApiError(502, f"machine {machine_id} is no longer alive")
        if not machine.api_endpoint:
            raise ApiError(
                502, f"machine {machine_id[:8]}... has no API endpoint; start its fleetd with --api-listen"
            )
        return machine.api_endpoint.rstrip("/")

    def peer_headers(self) -> dict[str, str]:
        headers = {FORWARDED_HEADER: self.machine_id}
        if self.peer_token:
            headers["Authorization"] = f"Bearer {self.peer_token}"
        return headers

    def local_info(self) -> LocalUnitInfo:
        if self.local is None:
            raise ApiError(
                503,
                "this fleetd was started without access to systemd; "
                "unit status and journal are unavailable here",
            )
        return self.local

    async def status(self, request: web.Request) -> web.StreamResponse:
        name = _unit_name(request).full
        machine_id = await self.locate(request, name)
        if machine_id == self.machine_id:
            output = await self.local_info().status(name)
            return web.json_response({"name": name, "machineID": machine_id, "status": output})
        endpoint = await self.peer(request, machine_id)
        try:
            async with httpx.AsyncClient(timeout=15) as client:
                reply = await client.get(
                    f"{endpoint}{request.path}", headers=self.peer_headers(), params={"machineID": machine_id}
                )
        except httpx.HTTPError as error:
            raise ApiError(502, f"cannot reach machine {machine_id[:8]}... at {endpoint}: {error}") from None
        return web.Response(status=reply.status_code, body=reply.content, content_type="application/json")

    async def journal(self, request: web.Request) -> web.StreamResponse:
        name = _unit_name(request).full
        try:
            lines = int(request.query.get("lines", "10"))
        except ValueError:
            lines = -1
        if lines < 0:
            raise ApiError(400, "lines must be a whole number of 0 or more")
        follow = request.query.get("follow", "false").lower() in ("1", "true", "yes")
        machine_id = await self.locate(request, name)
        if machine_id == self.machine_id:
            return await self.local_journal(request, name, lines, follow)
        return await self.forward_journal(request, machine_id, lines, follow)

    async def local_journal(
        self, request: web.Request, name: str, lines: int, follow: bool
    ) -> web.StreamResponse:
        local = self.local_info()
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await response.prepare(request)
        async with contextlib.aclosing(local.journal(name, lines, follow)) as output:
            async for line in output:
                await response.write(line.encode())
        await response.write_eof()
        return response

    async def forward_journal(
        self, request: web.Request, machine_id: str, lines: int, follow: bool
    ) -> web.StreamResponse:
        endpoint = await self.peer(request, machine_id)
        params = {"lines": str(lines), "follow": str(follow).lower(), "machineID": machine_id}
        response: web.StreamResponse | None = None
        try:
            async with (
                httpx.AsyncClient(timeout=httpx.Timeout(15, read=None)) as client,
                client.stream(
                    "GET", f"{endpoint}{request.path}", params=params, headers=self.peer_headers()
                ) as reply,
            ):
                if reply.status_code != 200:
                    return web.Response(
                        status=reply.status_code, body=await reply.aread(), content_type="application/json"
                    )
                response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
                await response.prepare(request)
                async for chunk in reply.aiter_bytes():
                    await response.write(chunk)
        except httpx.HTTPError as error:
            message = f"cannot reach machine {machine_id[:8]}... at {endpoint}: {error}"
            if response is None:
                raise ApiError(502, message) from None
            # Lines already went out: the reader learns of the break at the end of the text.
            await response.write(f"\n-- {message} --\n".encode())
        await response.write_eof()
        return response


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


def create_app(
    registry: AsyncRegistry,
    *,
    machine_id: str,
    local: LocalUnitInfo | None = None,
    peer_token: str | None = None,
) -> web.Application:
    """The API application; `serve` puts it on fleetd's sockets."""
    api = _Api(registry, machine_id, local, peer_token)
    app = web.Application(middlewares=[_errors, _authenticate], client_max_size=MAX_BODY)
    app[_AUTH] = _Auth()
    app.router.add_get("/fleet/v1/discovery", api.discovery)
    app.router.add_get("/fleet/v1/units", api.list_units)
    app.router.add_get("/fleet/v1/units/{name}", api.get_unit)
    app.router.add_put("/fleet/v1/units/{name}", api.put_unit)
    app.router.add_delete("/fleet/v1/units/{name}", api.delete_unit)
    app.router.add_get("/fleet/v1/state", api.list_states)
    app.router.add_get("/fleet/v1/state/{name}", api.get_state)
    app.router.add_get("/fleet/v1/machines", api.list_machines)
    app.router.add_patch("/fleet/v1/machines", api.patch_machines)
    app.router.add_get("/fleetpy/v1/units/{name}/pending", api.pending)
    app.router.add_get("/fleetpy/v1/units/{name}/explain", api.explain)
    app.router.add_get("/fleetpy/v1/units/{name}/status", api.status)
    app.router.add_get("/fleetpy/v1/units/{name}/journal", api.journal)
    return app


def _parse_listen(listen: str) -> tuple[str, int]:
    host, colon, port = listen.rpartition(":")
    if not colon or not port.isdigit():
        raise ValueError(f"bad API listen address {listen!r}; expected HOST:PORT, e.g. 127.0.0.1:49153")
    return host.strip("[]") or "0.0.0.0", int(port)


def _remove_stale_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ValueError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody answers: left behind by a fleetd that died
    else:
        raise ValueError(f"another process already serves {path}; is fleetd running twice?")
    finally:
        probe.close()


async def serve(
    app: web.Application,
    *,
    socket_path: str,
    listen: str | None = None,
    token: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> web.AppRunner:
    """Serve `app` on a unix socket (mode 0660) and, if `listen` is given, on TCP.

    TCP needs a token or TLS: the unix socket is guarded by file permissions, TCP by nothing
    else. Returns the runner; `await runner.cleanup()` stops serving.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both a certificate and a key")
    if listen and not (token or tls_cert):
        raise ValueError(
            f"refusing to serve the API on TCP {listen} without authentication; "
            "give an API token or a TLS certificate and key"
        )
    address = _parse_listen(listen) if listen else None
    app[_AUTH].token = token or None
    path = Path(socket_path)
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    _remove_stale_socket(path)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.UnixSite(runner, str(path)).start()
        os.chmod(path, 0o660)
        if address:
            context = None
            if tls_cert:
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.load_cert_chain(tls_cert, tls_key)
            await web.TCPSite(runner, address[0], address[1], ssl_context=context).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
