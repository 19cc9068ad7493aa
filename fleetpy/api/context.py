"""What every handler shares: the registry, this machine's id, the unit caches and request helpers."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from fleetpy.api.errors import ApiError
from fleetpy.api.views import unit_entity
from fleetpy.engine.engine import ParsedUnits
from fleetpy.registry import Job
from fleetpy.registry.aio import AsyncRegistry
from fleetpy.unit import UnitError, UnitFile, UnitName, load_unit


class ApiContext:
    """The registry and a cache of immutable unit files, shared by the route handlers."""

    def __init__(self, registry: AsyncRegistry, machine_id: str):
        self.registry = registry
        self.machine_id = machine_id
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


async def json_body(request: web.Request) -> Any:
    raw = await request.read()  # raises 413 beyond client_max_size
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, f"request body is not valid JSON: {error}") from None


def unit_name(request: web.Request) -> UnitName:
    return UnitName.parse(request.match_info["name"])
