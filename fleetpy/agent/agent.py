"""The agent loop: register the machine, follow its schedule, run units, publish their states."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging

from fleetpy.agent.tasks import Desired, Tasks, plan_tasks
from fleetpy.registry import Assignment, HistoryLost, Machine, StoreError, UnitState
from fleetpy.registry.aio import AsyncRegistry
from fleetpy.systemd import SystemdError

log = logging.getLogger(__name__)

# How long one watch long-poll may last; a quiet cluster costs one request per this period.
WATCH_TIMEOUT = 300.0
# Pause after etcd stayed unreachable through the store's own retries.
OUTAGE_PAUSE = 1.0


class Agent:
    """Runs, on one machine, exactly the units the engine assigned to it."""

    def __init__(self, registry: AsyncRegistry, systemd, machine: Machine, ttl: float):
        self.registry = registry
        self.systemd = systemd
        self.machine = machine
        self.ttl = ttl
        self.reconciled = asyncio.Event()  # set after each reconcile; lets tests and benches wait
        self._assigned: dict[str, Assignment] = {}
        self._texts: dict[str, str] = {}  # unit file text by hash: immutable, so safe to cache
        self._published: dict[str, UnitState] = {}
        self._to_publish: dict[str, tuple[str, str, str]] = {}
        self._publish_wanted = asyncio.Event()
        # The heartbeat gets a thread of its own: a burst of API requests or state writes that
        # fills the shared worker threads must not let the machine record expire.
        self._heartbeat_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="heartbeat")

    async def run(self) -> None:
        self.systemd.on_state_change(self._on_state_change)
        await self._until_registered()
        await asyncio.gather(self._heartbeat(), self._follow_schedule(), self._publish_states())

    async def _until_registered(self) -> None:
        while True:
            try:
                await self.registry.register_machine(self.machine, self.ttl)
                return
            except StoreError as error:
                log.warning("cannot register machine %s yet: %s", self.machine.id, error)
                await asyncio.sleep(OUTAGE_PAUSE)

    async def _heartbeat(self) -> None:
        loop = asyncio.get_running_loop()
        registry = self.registry.sync
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                beat = registry.refresh_machine, self.machine.id, self.ttl
                if not await loop.run_in_executor(self._heartbeat_thread, *beat):
                    log.warning("machine record had expired; registering again")
                    register = registry.register_machine, self.machine, self.ttl
                    await loop.run_in_executor(self._heartbeat_thread, *register)
            except StoreError as error:
                # Units keep running while etcd is away; we just try again next beat.
                log.warning("heartbeat failed: %s", error)

    async def _follow_schedule(self) -> None:
        index = None
        while True:
            try:
                if index is None:
                    index = await self.registry.index()
                    await self.reconcile(await self.registry.assignments(self.machine.id))
                changed = await self.registry.wait(index, "schedule", self.machine.id, timeout=WATCH_TIMEOUT)
                if changed is not None:
                    index = None  # read again from the current index
            except HistoryLost:
                index = None
            except (StoreError, SystemdError) as error:
                log.warning("reconcile failed, retrying: %s", error)
                index = None
                await asyncio.sleep(OUTAGE_PAUSE)

    async def reconcile(self, assignments: list[Assignment]) -> Tasks:
        """Bring systemd in line with `assignments`, the machine's whole schedule."""
        self._assigned = {a.unit: a for a in assignments}
        desired = {a.unit: Desired(await self._text(a.hash), a.desired_state) for a in assignments}
        self._texts = {a.hash: self._texts[a.hash] for a in assignments}  # keep only what runs here
        installed = await self.systemd.installed_units()
        active = {name: state[1] for name, state in (await self.systemd.unit_states(list(installed))).items()}
        tasks = plan_tasks(desired, installed, active)
        if tasks:
            log.info(
                "reconcile: stop %s remove %s write %s start %s",
                tasks.stop,
                tasks.remove,
                list(tasks.write),
                tasks.start,
            )
        await self._execute(tasks)
        for name in tasks.remove:
            self._published.pop(name, None)
            await self.registry.remove_state(name, self.machine.id)
        # Units we adopted or loaded without a state change still need a published state.
        unpublished = sorted(desired.keys() - self._published.keys())
        for name, state in (await self.systemd.unit_states(unpublished)).items():
            self._on_state_change(name, *state)
        self.reconciled.set()
        return tasks

    async def _text(self, digest: str) -> str:
        if digest not in self._texts:
            unit_file = await self.registry.unit_file(digest)
            if unit_file is None:
                raise StoreError(f"unit file {digest} is missing from the registry")
            self._texts[digest] = unit_file.to_text()
        return self._texts[digest]

    async def _execute(self, tasks: Tasks) -> None:
        await asyncio.gather(*(self._job(self.systemd.stop, name) for name in tasks.stop))
        if tasks.remove:
            await self.systemd.remove_units(tasks.remove)
        for name, text in tasks.write.items():
            await self.systemd.write_unit(name, text)
        if tasks.write:
            await self.systemd.link(list(tasks.write))
        await asyncio.gather(*(self._job(self.systemd.start, name) for name in tasks.start))

    async def _job(self, action, name: str) -> None:
        try:
            result = await action(name)
        except SystemdError as error:
            # One unit systemd refuses (a bad setting, say) must not hold up the others; its
            # published state shows the failure.
            result = str(error)
        if result != "done":
            log.warning("%s %s: %s", action.__name__, name, result)

    def _on_state_change(self, name: str, load: str, active: str, sub: str) -> None:
        if name in self._assigned:
            self._to_publish[name] = (load, active, sub)
            self._publish_wanted.set()

    async def _publish_states(self) -> None:
        while True:
            await self._publish_wanted.wait()
            self._publish_wanted.clear()
            batch, self._to_publish = self._to_publish, {}
            for name, (load, active, sub) in batch.items():
                assignment = self._assigned.get(name)
                if assignment is None:
                    continue
                state = UnitState(name, self.machine.id, assignment.hash, load, active, sub)
                if self._published.get(name) == state:
                    continue
                try:
                    await self.registry.publish_state(state)
                    self._published[name] = state
                except StoreError as error:
                    log.warning("cannot publish state of %s: %s", name, error)
                    self._to_publish.setdefault(name, (load, active, sub))
                    await asyncio.sleep(OUTAGE_PAUSE)
                    self._publish_wanted.set()
