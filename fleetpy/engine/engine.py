"""The engine loop: win the leader lease, then turn registry changes into schedule changes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fleetpy.engine.scheduler import Plan, plan
from fleetpy.registry import Assignment, HistoryLost, Job, StoreError
from fleetpy.registry.aio import AsyncRegistry
from fleetpy.unit import Unit, UnitError, load_unit

log = logging.getLogger(__name__)

WATCH_TIMEOUT = 300.0
OUTAGE_PAUSE = 1.0


class ParsedUnits:
    """Jobs with their parsed units. Unit files are immutable, so parses are kept by (name, hash)."""

    def __init__(self, registry: AsyncRegistry):
        self.registry = registry
        self._units: dict[tuple[str, str], Unit | None] = {}

    async def of(self, jobs: list[Job]) -> list[tuple[Job, Unit]]:
        parsed = []
        for job in jobs:
            key = (job.name, job.hash)
            if key not in self._units:
                unit_file = await self.registry.unit_file(job.hash)
                try:
                    self._units[key] = None if unit_file is None else load_unit(job.name, unit_file)
                except UnitError as error:
                    # The API validates on submit; this only guards against hand-edited keys.
                    log.error("engine: ignoring %s: %s", job.name, error)
                    self._units[key] = None
            if self._units[key] is not None:
                parsed.append((job, self._units[key]))
        # Forget destroyed and replaced units, or the cache would grow with every submit.
        live = {(job.name, job.hash) for job in jobs}
        self._units = {key: unit for key, unit in self._units.items() if key in live}
        return parsed


class Engine:
    """One per fleetd; only the one holding the leader lease schedules.

    Scheduling is driven by watches on jobs and machines (a submit, a state change, a machine
    joining or expiring wakes it within milliseconds); a full pass every `reconcile_interval`
    repairs anything a lost event or a crashed predecessor left behind.
    """

    def __init__(
        self, registry: AsyncRegistry, machine_id: str, lease_ttl: float, reconcile_interval: float = 30.0
    ):
        self.registry = registry
        self.machine_id = machine_id
        self.lease_ttl = lease_ttl
        self.reconcile_interval = reconcile_interval
        self.leading = asyncio.Event()
        self.units = ParsedUnits(registry)

    async def run(self) -> None:
        try:
            while True:
                try:
                    if await self.registry.acquire_leadership(self.machine_id, self.lease_ttl):
                        log.info("engine: this machine leads (%s)", self.machine_id)
                        await self._lead()
                    else:
                        await self._await_vacancy()
                except StoreError as error:
                    await self._outage("engine", error)
        finally:
            if self.leading.is_set():
                # Hand over at once instead of making the next engine wait out our lease.
                await self.registry.resign(self.machine_id)

    async def _await_vacancy(self) -> None:
        index = await self.registry.index()
        if await self.registry.leader() is not None:
            await self.registry.wait(index, "engine", timeout=self.lease_ttl)

    async def _lead(self) -> None:
        self.leading.set()
        changed = asyncio.Event()
        changed.set()
        tasks = [
            asyncio.create_task(coro)
            for coro in (
                self._watch("job", changed),
                self._watch("machines", changed),
                self._schedule_on(changed),
            )
        ]
        try:
            await self._keep_lease()
        finally:
            self.leading.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            try:
                if not await self.registry.renew_leadership(self.machine_id, self.lease_ttl):
                    log.warning("engine: lost the leader lease")
                    return
            except StoreError as error:
                log.warning("engine: cannot renew lease: %s", error)
                return

    async def _watch(self, directory: str, changed: asyncio.Event) -> None:
        index = await self.registry.index()
        while True:
            try:
                if await self.registry.wait(index, directory, timeout=WATCH_TIMEOUT) is not None:
                    # Skip to now: the pass this triggers reads everything up to here anyway.
                    index = await self.registry.index()
                    changed.set()
            except HistoryLost:
                index = await self.registry.index()
                changed.set()
            except StoreError as error:
                await self._outage(f"watch on {directory}", error)

    async def _schedule_on(self, changed: asyncio.Event) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), self.reconcile_interval)
            changed.clear()
            try:
                await self.reconcile()
            except StoreError as error:
                await self._outage("reconcile", error)
                changed.set()

    async def _outage(self, what: str, error: StoreError) -> None:
        log.warning("engine: %s: %s", what, error)
        await asyncio.sleep(OUTAGE_PAUSE)

    async def reconcile(self) -> Plan:
        """Read the cluster, compute the plan, and write only the difference."""
        machines, jobs, current, pending = await asyncio.gather(
            self.registry.machines(),
            self.registry.jobs(),
            self.registry.assignments(),
            self.registry.pending(),
        )
        orphaned = {a.machine_id for a in current} - {m.id for m in machines}
        settle = await self.registry.last_failure() + self.lease_ttl - time.monotonic()
        if orphaned and settle > 0:
            # Right after etcd was away, machine records may have expired while their agents
            # are fine: give them one TTL to register again before moving their units.
            log.info(
                "engine: %d machine(s) missing just after an etcd outage; waiting %.1fs",
                len(orphaned),
                settle,
            )
            await asyncio.sleep(settle)
            return await self.reconcile()
        new_plan = plan(machines, await self.units.of(jobs), current)
        await self.apply(new_plan, current, pending)
        return new_plan

    async def apply(self, new_plan: Plan, current: list[Assignment], pending: dict[str, str]) -> None:
        wanted = {(a.unit, a.machine_id): a for a in new_plan.assignments}
        existing = {(a.unit, a.machine_id): a for a in current}
        writes = []
        for key in existing.keys() - wanted.keys():
            unit, machine_id = key
            writes.append(self.registry.unassign(unit, machine_id))
            writes.append(self.registry.remove_state(unit, machine_id))
        # Unassign before assigning, so Conflicts/Replaces never see both copies at once.
        await asyncio.gather(*writes)
        await asyncio.gather(
            *(self.registry.assign(a) for key, a in wanted.items() if existing.get(key) != a)
        )
        await asyncio.gather(
            *(self.registry.set_pending(u, r) for u, r in new_plan.pending.items() if pending.get(u) != r),
            *(self.registry.set_pending(u, None) for u in pending.keys() - new_plan.pending.keys()),
        )
        if changed := len(writes) // 2 + sum(existing.get(k) != a for k, a in wanted.items()):
            log.info("engine: %d schedule changes", changed)
