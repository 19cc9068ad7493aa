"""What every handler shares: the registry, this machine's id, the unit cache and request helpers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from typing import Any

from aiohttp import web

from fleetpy.api.connections import LIMITS
from fleetpy.api.errors import ApiError
from fleetpy.api.views import unit_entity
from fleetpy.registry import Job, Registry
from fleetpy.unit import Unit, UnitError, UnitFile, UnitName, load_unit

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StoredUnit:
    """A job's unit file and its parse; None where the stored text no longer parses or loads."""

    file: UnitFile | None
    unit: Unit | None

    @property
    def is_global(self) -> bool:
        return self.unit is not None and self.unit.fleet.is_global


class ApiContext:
    """The registry, and the one cache of parsed units that the route handlers share."""

    def __init__(self, registry: Registry, machine_id: str):
        self.registry = registry
        self.machine_id = machine_id
        # Unit files are content-addressed, so an entry keyed by (name, hash) never goes stale.
        self._units: dict[tuple[str, str], StoredUnit] = {}

    async def stored(self, job: Job) -> StoredUnit | None:
        """The job's unit, or None if its file is missing from the registry."""
        key = (job.name, job.hash)
        if key not in self._units:
            unit_file = unit = None
            try:
                unit_file = await self.registry.unit_file(job.hash)
                if unit_file is None:
                    return None
                unit = load_unit(job.name, unit_file)
            except UnitError as error:
                # The API validates on submit; this guards against older or hand-edited records,
                # which the engine shows as pending with the reason. One bad record must not
                # make every listing fail.
                log.error("api: stored unit %s does not load: %s", job.name, error)
            self._units[key] = StoredUnit(unit_file, unit)
        return self._units[key]

    async def all_units(self) -> list[tuple[Job, Unit]]:
        """Every job with its parsed unit; also forgets destroyed and replaced units."""
        jobs = await self.registry.jobs()
        found = [(job, await self.stored(job)) for job in jobs]
        live = {(job.name, job.hash) for job in jobs}
        self._units = {key: unit for key, unit in self._units.items() if key in live}
        return [(job, stored.unit) for job, stored in found if stored is not None and stored.unit is not None]

    async def entities(self, jobs: list[Job]) -> list[dict]:
        # Grouped by unit once: each entity looks at its own assignments, not all of them.
        assignments: dict[str, list] = {}
        for assignment in await self.registry.assignments():
            assignments.setdefault(assignment.unit, []).append(assignment)
        states = {(s.unit, s.machine_id): s for s in await self.registry.states()}
        alive = {m.id for m in await self.registry.machines()}
        result = []
        for job in jobs:
            stored = await self.stored(job)
            result.append(
                unit_entity(
                    job,
                    stored.file if stored else None,
                    stored is not None and stored.is_global,
                    assignments.get(job.name, ()),
                    states,
                    alive,
                )
            )
        return result

    async def existing_job(self, name: str) -> Job:
        job = await self.registry.job(name)
        if job is None:
            raise ApiError(404, f"unit {name} not found")
        return job


async def json_body(request: web.Request) -> Any:
    timeout = request.app[LIMITS].body_timeout
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()  # raises 413 beyond client_max_size
    except TimeoutError:
        raise ApiError(408, f"request body did not arrive within {timeout:g}s") from None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, f"request body is not valid JSON: {error}") from None
    except RecursionError:
        raise ApiError(
            400, "request body is JSON nested too deeply; fleet's bodies are two levels deep"
        ) from None


def unit_name(request: web.Request) -> UnitName:
    return UnitName.parse(request.match_info["name"])
