"""fleetpy's /fleetpy/v1 routes: why a unit is pending or placed, its status and its journal,
draining machines, and volumes (local ones and their moves, shared ones)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterable
from pathlib import Path

from aiohttp import web

from fleetpy.agent.moves import stream
from fleetpy.api.connections import deadline
from fleetpy.api.context import ApiContext, json_body, unit_name
from fleetpy.api.errors import ApiError
from fleetpy.api.local import LocalUnitInfo
from fleetpy.api.peer import FORWARDED_HEADER, Peers
from fleetpy.conf.values import short_machine_id
from fleetpy.engine.explain import explain_placement
from fleetpy.registry import MOVE_COPYING, Job, Machine, VolumeRecord, moves
from fleetpy.unit import Unit, UnitFile, UnitName, load_unit
from fleetpy.unit.errors import InvalidFleetOptions
from fleetpy.unit.fleet import LOCAL, SHARED, check_volume_name


def _volume_name(request: web.Request) -> str:
    name = request.match_info["name"]
    try:
        return check_volume_name(name)
    except InvalidFleetOptions as error:
        raise ApiError(400, str(error)) from None


def volume_users(units: Iterable[tuple[Job, Unit]]) -> dict[tuple[str, str], list[str]]:
    """The volumes submitted units name, by (name, driver), each with those units in name order
    (templates' names hold %i: their instances say which volumes they use)."""
    found: dict[tuple[str, str], list[str]] = {}
    for job, unit in sorted(units, key=lambda pair: pair[0].name):
        if not unit.name.is_template:
            for driver, names in ((LOCAL, unit.fleet.volumes), (SHARED, unit.fleet.shared_volumes)):
                for name in names:
                    found.setdefault((name, driver), []).append(job.name)
    return found


def _volume_view(name: str, record: VolumeRecord) -> dict:
    return {
        "name": name,
        "driver": LOCAL,
        "machineID": record.machine_id,
        "move": None if record.move is None else record.move.to_json(),
    }


def _why_not_movable(name: str, home: str, target: str, machines: dict[str, Machine]) -> str | None:
    """Why volume `name` cannot move from `home` to `target` now, if it cannot."""
    if machines[target].cordoned:
        return (
            f"machine {short_machine_id(target)} is drained, so the volume's units could not run there; "
            "choose another machine or 'fleetctl uncordon' it first"
        )
    source = machines.get(home)
    if source is None:
        return (
            f"volume {name} lives on {short_machine_id(home)}, a machine that is gone: its data cannot be "
            f"copied ('fleetctl volume rm {name}' starts it afresh elsewhere)"
        )
    if not source.api_endpoint:
        return (
            f"machine {short_machine_id(home)} has no API endpoint, and the target fetches the data from "
            "it; start its fleetd with --api-listen"
        )
    return None


class FleetpyV1:
    """The handlers of fleetpy's extensions; status and journal go to the unit's machine."""

    def __init__(
        self, context: ApiContext, local: LocalUnitInfo | None, peers: Peers, volume_dir: Path | None = None
    ):
        self.context = context
        self.registry = context.registry
        # etcd itself, not the API's watch-fed copy: a volume move's steps compare and swap, and
        # its source serves the data only on the record as it is now.
        self.etcd = peers.registry
        self.volume_dir = volume_dir
        self.machine_id = context.machine_id
        self.local = local
        self.peers = peers
        # Requests following a journal, which never end by themselves: cut when fleetd stops.
        self.followers: set[asyncio.Task] = set()

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/fleetpy/v1/units/{name}/pending", self.pending)
        router.add_get("/fleetpy/v1/units/{name}/explain", self.explain)
        router.add_get("/fleetpy/v1/units/{name}/status", self.status, name="status")
        router.add_get("/fleetpy/v1/units/{name}/journal", self.journal, name="journal")
        router.add_post("/fleetpy/v1/units/{name}/plan", self.plan)
        router.add_put("/fleetpy/v1/machines/{id}/cordon", self.cordon)
        router.add_delete("/fleetpy/v1/machines/{id}/cordon", self.uncordon)
        router.add_get("/fleetpy/v1/volumes", self.volumes)
        router.add_delete("/fleetpy/v1/volumes/{name}", self.forget_volume)
        router.add_get("/fleetpy/v1/volumes/{name}", self.volume)
        router.add_post("/fleetpy/v1/volumes/{name}/move", self.move_volume)
        router.add_get("/fleetpy/v1/volumes/{name}/data", self.volume_data, name="volume-data")

    async def stop_followers(self, app: web.Application) -> None:
        for task in self.followers:
            task.cancel()

    async def explain(self, request: web.Request) -> web.Response:
        name = unit_name(request).full
        await self.context.existing_job(name)
        units = await self.context.all_units()
        machines, current = await self.registry.machines(), await self.registry.assignments()
        pending, avoided = await self.registry.pending(), await self.registry.avoided()
        volumes, moving = moves.where(await self.registry.volume_records())
        lines = explain_placement(name, machines, units, current, pending, volumes, avoided, moving)
        return web.json_response({"name": name, "lines": lines})

    async def cordon(self, request: web.Request) -> web.Response:
        """Drain a machine: the engine keeps new units off it and moves its units away."""
        await self.registry.set_cordon(await self._live_machine(request), True)
        return web.Response(status=204)

    async def uncordon(self, request: web.Request) -> web.Response:
        await self.registry.set_cordon(await self._live_machine(request), False)
        return web.Response(status=204)

    async def _live_machine(self, request: web.Request) -> str:
        machine_id = request.match_info["id"]
        if machine_id not in {m.id for m in await self.registry.machines()}:
            raise ApiError(404, f"machine {machine_id} not found; see 'fleetctl list-machines -l'")
        return machine_id

    async def plan(self, request: web.Request) -> web.Response:
        """Where the unit would go if it were started now, and why; nothing is written."""
        name = unit_name(request)
        if name.is_template:
            raise ApiError(
                400, f"{name.full} is a template; plan an instance such as {name.prefix}@1.{name.suffix}"
            )
        body = await json_body(request) if request.can_read_body else {}
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object with the unit's options, or empty")
        options = body.get("options")
        unit_file = UnitFile.from_options(options) if options is not None else await self._stored_file(name)
        unit = load_unit(name.full, unit_file)  # the same door as submitting it
        units = [(job, u) for job, u in await self.context.all_units() if job.name != name.full]
        units.append((Job(name.full, unit_file.hash, "launched"), unit))
        machines, current = await self.registry.machines(), await self.registry.assignments()
        volumes, moving = moves.where(await self.registry.volume_records())
        avoided = await self.registry.avoided()
        lines = explain_placement(
            name.full, machines, units, current, volumes=volumes, avoided=avoided, moving=moving
        )
        return web.json_response({"name": name.full, "lines": lines})

    async def _stored_file(self, name: UnitName) -> UnitFile:
        """The submitted unit's file, or for an instance its submitted template's."""
        for candidate in (name.full, name.template if name.is_instance else None):
            job = await self.registry.job(candidate) if candidate else None
            stored = await self.context.stored(job) if job is not None else None
            if stored is not None and stored.file is not None:
                return stored.file
        raise ApiError(404, f"unit {name.full} is not submitted; send its options to plan it")

    async def volumes(self, request: web.Request) -> web.Response:
        """Every local volume, the machine it lives on and its last move; and every shared volume
        a submitted unit names (recorded nowhere: they live on every machine's shared directory)."""
        records = await self.registry.volume_records()
        users = volume_users(await self.context.all_units())
        views = [{**_volume_view(n, r), "units": users.get((n, LOCAL), [])} for n, r in records.items()]
        views += [
            {"name": name, "driver": SHARED, "machineID": None, "move": None, "units": units}
            for (name, driver), units in users.items()
            if driver == SHARED
        ]
        return web.json_response({"volumes": sorted(views, key=lambda v: (v["name"], v["driver"]))})

    async def volume(self, request: web.Request) -> web.Response:
        """One volume, as etcd has it now (fleetctl volume move follows its move here)."""
        name = _volume_name(request)
        record = await self.etcd.volume_record(name)
        if record is None:
            raise ApiError(404, f"volume {name} not found; see 'fleetctl list-volumes'")
        return web.json_response(_volume_view(name, record))

    async def move_volume(self, request: web.Request) -> web.Response:
        """Start moving a volume's data to another machine (202), or say it lives there (200)."""
        name = _volume_name(request)
        body = await json_body(request)
        target = body.get("machineID") if isinstance(body, dict) else None
        if not isinstance(target, str) or not target:
            raise ApiError(400, 'request body must be {"machineID": "<the machine to move the volume to>"}')
        machines = {m.id: m for m in await self.etcd.machines()}
        if target not in machines:
            raise ApiError(404, f"machine {target} not found; see 'fleetctl list-machines -l'")
        record = await self.etcd.volume_record(name)
        if record is None and any(
            name in unit.fleet.shared_volumes for _, unit in await self.context.all_units()
        ):
            raise ApiError(
                400,
                f"volume {name} is shared (Volume={name}:shared): every machine mounts its data, so it has "
                "nothing to move; its units find it wherever they run",
            )
        if record is None:
            raise ApiError(404, f"volume {name} not found; see 'fleetctl list-volumes'")
        if record.machine_id != target and record.moving is None:
            refusal = _why_not_movable(name, record.machine_id, target, machines)
            if refusal is not None:
                raise ApiError(409, refusal)
        try:
            after = await self.etcd.update_volume(name, moves.start(name, target, time.time()))
        except moves.MoveRefused as refused:
            raise ApiError(404 if refused.kind == "not-found" else 409, str(refused)) from None
        assert after is not None
        started = after.moving is not None and after.moving.target == target
        return web.json_response(
            {**_volume_view(name, after), "started": started}, status=202 if started else 200
        )

    async def volume_data(self, request: web.Request) -> web.StreamResponse:
        """The volume's data as a tar stream (agent.moves.pack): only to the target of its move,
        only while the move is copying from this machine, when no unit using it runs here."""
        name = _volume_name(request)
        async with deadline(request):  # the stream itself takes as long as the volume needs
            record = await self.etcd.volume_record(name)
        move = record.moving if record is not None else None
        if move is None or move.state != MOVE_COPYING or move.source != self.machine_id:
            raise ApiError(409, f"volume {name} is not being copied from this machine")
        if request.headers.get(FORWARDED_HEADER) != move.target:
            raise ApiError(
                403, f"only the fleetd of machine {short_machine_id(move.target)} may fetch volume {name}"
            )
        if self.volume_dir is None:
            raise ApiError(503, "this fleetd serves no volumes")
        path = self.volume_dir / name
        if not os.path.isdir(path) or os.path.islink(path):
            raise ApiError(409, f"volume {name} has no directory at {path} on this machine")
        response = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
        await response.prepare(request)
        await stream(path, response.write)
        await response.write_eof()
        return response

    async def forget_volume(self, request: web.Request) -> web.Response:
        """Forget where a volume lives, so its units may start afresh on another machine (the
        data stays on the old machine's disk)."""
        name = _volume_name(request)
        record = await self.etcd.volume_record(name)
        if record is not None and record.moving is not None:
            raise ApiError(409, f"volume {name} is moving; wait for the move to end")
        if not await self.registry.forget_volume(name):
            raise ApiError(404, f"volume {name} not found; see 'fleetctl list-volumes'")
        return web.Response(status=204)

    async def pending(self, request: web.Request) -> web.Response:
        name = unit_name(request).full
        await self.context.existing_job(name)
        reason = (await self.registry.pending()).get(name)
        return web.json_response({"name": name, "reason": reason})

    async def locate(self, request: web.Request, name: str) -> str:
        """The live machine running `name`; this one if it is among several."""
        async with deadline(request):
            return await self._locate(request, name)

    async def _locate(self, request: web.Request, name: str) -> str:
        await self.context.existing_job(name)
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

    def local_info(self) -> LocalUnitInfo:
        if self.local is None:
            raise ApiError(
                503,
                "this fleetd was started without access to systemd; "
                "unit status and journal are unavailable here",
            )
        return self.local

    async def status(self, request: web.Request) -> web.StreamResponse:
        name = unit_name(request).full
        machine_id = await self.locate(request, name)
        if machine_id == self.machine_id:
            output = await self.local_info().status(name)
            return web.json_response({"name": name, "machineID": machine_id, "status": output})
        return await self.peers.status(request, machine_id)

    async def journal(self, request: web.Request) -> web.StreamResponse:
        name = unit_name(request).full
        try:
            lines = int(request.query.get("lines", "10"))
        except ValueError:
            lines = -1
        if lines < 0:
            raise ApiError(400, "lines must be a whole number of 0 or more")
        follow = request.query.get("follow", "false").lower() in ("1", "true", "yes")
        machine_id = await self.locate(request, name)
        task = asyncio.current_task()
        if follow and task is not None:
            self.followers.add(task)
        try:
            if machine_id == self.machine_id:
                return await self.local_journal(request, name, lines, follow)
            return await self.peers.journal(request, machine_id, lines, follow)
        finally:
            self.followers.discard(task)

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
