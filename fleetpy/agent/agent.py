"""The agent loop: register the machine, follow its schedule, run units, publish their states."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from fleetpy.agent.facts import Facts, FactSource, changed_enough
from fleetpy.agent.health import STARTING, ExecContext, HealthMonitor, Probe, judge, probe
from fleetpy.agent.moves import VolumeMoves, VolumeSource
from fleetpy.agent.tasks import RUNNING, STARTED, Desired, Tasks, plan_tasks
from fleetpy.agent.volumes import VolumeError, prepare_shared_volume, prepare_volume, with_volumes
from fleetpy.conf import metrics
from fleetpy.events import AgentEvents
from fleetpy.registry import Assignment, Health, HistoryLost, Machine, Registry, StoreError, UnitState
from fleetpy.supervise import supervise
from fleetpy.systemd import State, SystemdError, SystemdManager
from fleetpy.unit.fleet import Constraint, HealthCheck, parse_constraint, parse_fleet_options
from fleetpy.unit.name import validate_unit_name

log = logging.getLogger(__name__)

# How long one watch long-poll may last; a quiet cluster costs one request per this period.
WATCH_TIMEOUT = 300.0
# Pause after etcd stayed unreachable through the store's own retries.
OUTAGE_PAUSE = 1.0
# The state shown for a unit the agent cannot handle: it never reached systemd as it should.
QUARANTINED = ("error", "failed", "failed")
# A start that failed because systemd was unreachable is tried again on the next pass.
DISCONNECTED = "fleetpy.Disconnected"
# Fencing: after this share of the TTL without a renewed heartbeat, fenced units are stopped;
# the rest of the TTL is for stopping them before the machine record expires and the engine
# starts them elsewhere. With heartbeats every TTL/3, that is two missed beats.
FENCE_AFTER = 0.6
# How long a stopping agent tries to renew its machine record one last time.
LAST_BEAT = 0.5


@dataclass(frozen=True)
class _UnitText:
    """What the agent needs of one unit file, cached by its hash (unit files never change)."""

    text: str
    fence: bool
    health: HealthCheck | None
    exec_context: ExecContext
    volumes: tuple[str, ...] = ()  # local ones
    shared_volumes: tuple[str, ...] = ()


class Agent:
    """Runs, on one machine, exactly the units the engine assigned to it."""

    def __init__(
        self,
        registry: Registry,
        systemd: SystemdManager,
        machine: Machine,
        ttl: float,
        fence: bool = False,
        clock: Callable[[], float] = time.monotonic,
        events: AgentEvents | None = None,
        facts: FactSource | None = None,
        facts_interval: float = 0.0,
        health_probe: Probe = probe,
        volume_dir: Path = Path("/var/lib/fleetpy/volumes"),
        volume_source: VolumeSource | None = None,
        shared_volume_dir: Path | None = None,
    ):
        self.registry = registry
        # Live facts: read every `facts_interval` (0: only at start), written with a heartbeat
        # when they changed enough (see facts.changed_enough).
        self.facts = facts
        self.facts_interval = facts_interval
        self._fresh_facts: Facts | None = None
        self._asked: list[Constraint] = []  # constraints of pending units, as the engine wrote them
        self.events = events or AgentEvents()
        self.systemd = systemd
        self.machine = machine
        self.ttl = ttl
        self.fence = fence  # fence every unit, as [X-Fleet] Fence=true fences one
        self.volume_dir = volume_dir
        # Where shared volumes live (storage every machine mounts), or None: then the machine
        # record says so (Machine.shared_volumes) and the engine sends no such unit here.
        self.shared_volume_dir = shared_volume_dir
        # This machine's steps of volume moves; `volume_source` fetches from the source machine.
        self.volume_moves = VolumeMoves(
            registry, machine.id, volume_dir, self._volume_idle, volume_source, self.events
        )
        self._clock = clock
        # When the last heartbeat that etcd took was sent: the machine record lives at least
        # until this plus the TTL.
        self._renewed_at = clock()
        self._fence_units: set[str] = set()  # assigned units to stop when the heartbeat is lost
        self._fenced: set[str] = set()  # stopped by the fence; started again when it is back
        self._resync: asyncio.Task | None = None
        self._reconciling = asyncio.Lock()
        self.reconciled = asyncio.Event()  # set after each reconcile; lets tests and benches wait
        self._assigned: dict[str, Assignment] = {}
        # Unit file text, Fence= and health check by hash: immutable, so safe to cache.
        self._texts: dict[str, _UnitText] = {}
        # Health checks of the launched units that have one, with the hash they came from; the
        # health of each that runs; and the last health of each, which a restart carries over
        # (the restarts so far, and what the failed check said).
        self._checks: dict[str, tuple[str, HealthCheck, ExecContext]] = {}
        self._health: dict[str, Health] = {}
        self._last_health: dict[str, Health] = {}
        self._states: dict[str, State] = {}  # the last state systemd reported of each unit
        self.health_monitor = HealthMonitor(self._on_health_result, health_probe, clock)
        # Launched units started (or adopted) with their current content; None before the first
        # pass. A unit in here is not started again when it fails: systemd's Restart= decides.
        self._started: set[str] | None = None
        # Units this agent cannot handle, with the reason shown as their state.
        self._quarantined: dict[str, str] = {}
        # State records this agent wrote (read back from etcd on the first pass).
        self._published: dict[str, UnitState] | None = None
        self._to_publish: dict[str, State] = {}
        self._publish_wanted = asyncio.Event()
        # Held while state records are written or removed, so a late write never brings back
        # the state of a unit that was just unassigned.
        self._state_writes = asyncio.Lock()
        systemd.on_state_change(self._on_state_change)

    async def run(self) -> None:
        if self.facts is not None:
            await self._read_facts()
            if self._fresh_facts is not None:
                self.machine = dataclasses.replace(self.machine, facts=self._fresh_facts)
        await self._until_registered()
        tasks = (
            [
                supervise("agent: facts", self._refresh_facts),
                supervise("agent: asked facts", self._follow_asked),
            ]
            if self.facts and self.facts_interval
            else []
        )
        try:
            await asyncio.gather(
                *tasks,
                supervise("agent: heartbeat", self._heartbeat),
                supervise("agent: schedule follower", self._follow_schedule),
                supervise("agent: state publisher", self._publish_states),
                supervise("agent: fence", self._fence_watch),
                supervise("agent: health checks", self.health_monitor.run),
                supervise("agent: volume moves", self.volume_moves.run),
            )
        finally:
            await self.health_monitor.close()
            # A fleetd that stops (to restart, say) gives itself a whole TTL to come back in
            # before the engine moves its units, not whatever was left since the last beat.
            with contextlib.suppress(StoreError, TimeoutError):
                async with asyncio.timeout(LAST_BEAT):
                    await self.registry.refresh_machine(self.machine.id, self.ttl)

    async def _until_registered(self) -> None:
        while True:
            try:
                sent = self._clock()
                await self.registry.register_machine(self.machine, self.ttl)
                self._renewed_at = sent
                self.events.joined(self.machine)
                return
            except StoreError as error:
                log.warning("cannot register machine %s yet: %s", self.machine.id, error)
                await asyncio.sleep(OUTAGE_PAUSE)

    async def _read_facts(self) -> None:
        assert self.facts is not None
        try:
            self._fresh_facts = await self.facts.read()
        except Exception as error:  # noqa: BLE001 - a fact that cannot be read must not stop the agent
            log.warning("agent: cannot read this machine's facts: %s", error)

    async def _refresh_facts(self) -> None:
        while True:
            await asyncio.sleep(self.facts_interval)
            await self._read_facts()

    async def _follow_asked(self) -> None:
        """Keep `_asked` as the engine last wrote it (one long-poll while nothing changes)."""
        index = None
        while True:
            try:
                if index is None:
                    index = await self.registry.index()
                    self._asked = _constraints(await self.registry.asked_facts())
                if await self.registry.wait(index, "asked-facts", timeout=WATCH_TIMEOUT) is not None:
                    index = None
            except HistoryLost:
                index = None
            except StoreError as error:
                log.warning("agent: cannot read the facts units ask about: %s", error)
                index = None
                await asyncio.sleep(OUTAGE_PAUSE)

    def _facts_to_publish(self) -> Facts | None:
        fresh = self._fresh_facts
        if fresh is None or not changed_enough(self.machine.facts, fresh, self._asked):
            return None
        return fresh

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                sent = self._clock()
                facts = self._facts_to_publish()
                if facts is not None:
                    # Facts that changed enough ride on this beat: one write instead of a keepalive.
                    machine = dataclasses.replace(self.machine, facts=facts)
                    await self.registry.register_machine(machine, self.ttl)
                    self.machine = machine
                # One keepalive on etcd v3, one refresh request on v2 (in the v2 store's threads).
                elif not await self.registry.refresh_machine(self.machine.id, self.ttl):
                    log.warning("machine record had expired; registering again")
                    await self.registry.register_machine(self.machine, self.ttl)
                    self.events.joined(self.machine, again=True)
                self._renewed(sent)
                self.events.etcd(None)
            except StoreError as error:
                # Units keep running while etcd is away; we just try again next beat.
                log.warning("heartbeat failed: %s", error)
                self.events.etcd(error)

    async def _follow_schedule(self) -> None:
        """List the schedule, and list it again on each change the watch reports: the listing,
        not a change record, is what the agent acts on. (Acting on the records alone stopped a
        running unit during an etcd outage on the v2 API in the fault suite; it was taken back.)"""
        index = None
        while True:
            try:
                if index is None:
                    assignments, index = await self.registry.schedule_of(self.machine.id)
                    await self.reconcile(assignments)
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
        """Bring systemd in line with `assignments`, the machine's whole schedule.

        A unit that cannot be handled (a bad name, an unreadable unit file, a write systemd
        refuses) is quarantined: shown failed with the reason, logged once, left alone, while
        the other units go on. Only etcd or systemd being unreachable fails the whole pass.
        """
        async with self._reconciling:
            with metrics.RECONCILE_SECONDS.time():
                return await self._reconcile(assignments)

    async def _reconcile(self, assignments: list[Assignment]) -> Tasks:
        if self._published is None:
            mine = [s for s in await self.registry.states() if s.machine_id == self.machine.id]
            self._published = {s.unit: s for s in mine}
        before, self._assigned = self._assigned, {a.unit: a for a in assignments}
        # New content or none: its health so far is the old content's, so it goes before any
        # state is published under the new hash.
        for name, old in before.items():
            if self._assigned.get(name, old).hash != old.hash or name not in self._assigned:
                self._forget_health(name)
        self._states = {n: state for n, state in self._states.items() if n in self._assigned}
        quarantined, self._quarantined = self._quarantined, {}
        desired = await self._desired(assignments)
        self._texts = {a.hash: self._texts[a.hash] for a in assignments if a.hash in self._texts}
        # Units set aside are left as they are on disk and in systemd.
        installed = {
            n: t for n, t in (await self.systemd.installed_units()).items() if n not in self._quarantined
        }
        active = {name: state[1] for name, state in (await self.systemd.unit_states(list(installed))).items()}
        tasks = plan_tasks(desired, installed, active, self._started)
        # Without a heartbeat, a fenced unit stopped here must not start again.
        held = {n for n in tasks.start if n in self._fence_units} if self._heartbeat_lost() else set()
        tasks.start = [n for n in tasks.start if n not in held]
        if tasks:
            log.info(
                "reconcile: stop %s remove %s write %s start %s",
                tasks.stop,
                tasks.remove,
                list(tasks.write),
                tasks.start,
            )
        not_started = await self._execute(tasks) | held
        started = (
            self._started if self._started is not None else {n for n in desired if active.get(n) in STARTED}
        )
        self._started = {
            name
            for name, want in desired.items()
            if want.desired_state == "launched"
            and name not in self._quarantined
            and name not in not_started
            and (name in tasks.start or name in started)
        }
        for name, reason in self._quarantined.items():
            if quarantined.get(name) != reason:
                log.error("agent: unit %s quarantined: %s", name, reason)
        await self._remove_states(self._published.keys() - self._assigned.keys())
        # Publish every assigned unit's state: the publisher skips what is already in etcd.
        ours = [n for n in desired if n not in self._quarantined]
        for name, state in (await self.systemd.unit_states(ours)).items():
            self._on_state_change(name, *state)
        for name in self._quarantined.keys() & self._assigned.keys():
            self._to_publish[name] = QUARANTINED
        self._publish_wanted.set()
        self.reconciled.set()
        self.volume_moves.wanted.set()  # units taken away are stopped now: a move may go on
        return tasks

    async def _desired(self, assignments: list[Assignment]) -> dict[str, Desired]:
        desired = {}
        self._fence_units = set()
        checks = {}
        unreadable = await self._fetch_unit_files(assignments)
        for a in assignments:
            try:
                validate_unit_name(a.unit)
                if a.hash in unreadable:
                    raise LookupError(unreadable[a.hash])
                unit = self._texts[a.hash]
                text = (
                    with_volumes(unit.text, await self._volumes(unit))
                    if unit.volumes or unit.shared_volumes
                    else unit.text
                )
                desired[a.unit] = Desired(text, a.desired_state)
                if self.fence or unit.fence:
                    self._fence_units.add(a.unit)
                if unit.health is not None and a.desired_state == "launched":
                    checks[a.unit] = (a.hash, unit.health, unit.exec_context)
            except StoreError:
                raise  # etcd is away: the whole pass is retried
            except (VolumeError, OSError) as error:
                self._quarantine(a.unit, f"cannot use its volume: {error}")
            except Exception as error:
                self._quarantine(a.unit, f"cannot read its unit file: {error}")
        self._set_checks(checks)
        return desired

    async def _volumes(self, unit: _UnitText) -> dict[str, Path]:
        """Each volume's directory, made here if missing. A local one is recorded as living on
        this machine before the unit starts, so the engine keeps the unit here from now on; a
        shared one is on every machine and recorded nowhere."""
        paths = {}
        for name in unit.volumes:
            paths[name] = prepare_volume(self.volume_dir, name)
            home = await self.registry.claim_volume(name, self.machine.id)
            if home != self.machine.id:
                raise VolumeError(f"volume {name} lives on machine {home}, not on this one")
        for name in unit.shared_volumes:
            paths[name] = prepare_shared_volume(self.shared_volume_dir, name)
        return paths

    async def _volume_idle(self, name: str) -> bool:
        """Whether no unit assigned here uses volume `name`: asked between reconcile passes, so
        a unit no longer assigned has been stopped. A unit whose file was not read yet counts."""
        async with self._reconciling:
            if self._published is None:
                return False  # no pass yet: what runs here is not known
            return not any(
                a.hash not in self._texts or name in self._texts[a.hash].volumes
                for a in self._assigned.values()
            )

    def _set_checks(self, checks: dict[str, tuple[str, HealthCheck, ExecContext]]) -> None:
        """Stop checking units that lost their check (or got new content); they start over."""
        for name, (digest, check, _) in self._checks.items():
            now = checks.get(name)
            if now is None or now[0] != digest or now[1] != check:
                self._forget_health(name)
        self._checks = checks

    def _forget_health(self, name: str) -> None:
        self.health_monitor.unwatch(name)
        self._health.pop(name, None)
        self._last_health.pop(name, None)

    def _quarantine(self, name: str, reason: str) -> None:
        self._quarantined[name] = f"fleetpy agent: {reason}"

    async def _fetch_unit_files(self, assignments: list[Assignment]) -> dict[str, str]:
        """Read the unit files not yet cached, all in one registry read, into `_texts` (each
        file's text, whether it asks for fencing, its health check); those that cannot be
        used, by hash, with why (left uncached, so the next pass tries them again)."""
        first_name = {a.hash: a.unit for a in reversed(assignments) if a.hash not in self._texts}
        if not first_name:
            return {}
        unreadable = {}
        for digest, unit_file in (await self.registry.unit_files(first_name)).items():
            if isinstance(unit_file, str):
                unreadable[digest] = unit_file
                continue
            try:
                options = parse_fleet_options(first_name[digest], unit_file)
                self._texts[digest] = _UnitText(
                    unit_file.to_text(),
                    options.fence,
                    options.health,
                    ExecContext.of(unit_file),
                    options.volumes,
                    options.shared_volumes,
                )
            except Exception as error:  # noqa: BLE001 - one bad file quarantines its units only
                unreadable[digest] = str(error)
        return unreadable

    async def _execute(self, tasks: Tasks) -> set[str]:
        """Do the tasks, each unit inside its own error boundary; the units to start next time."""
        await asyncio.gather(*(self._job(self.systemd.stop, name) for name in tasks.stop))
        if tasks.remove:
            await self._each(self.systemd.remove_units, tasks.remove, "remove")
        written = []
        for name, text in tasks.write.items():
            try:
                await self.systemd.write_unit(name, text)
                written.append(name)
            except Exception as error:
                self._quarantine(name, f"cannot write its unit file: {error}")
        if written:
            await self._each(self.systemd.link, written, "link")
        starts = [n for n in tasks.start if n not in self._quarantined]
        results = await asyncio.gather(*(self._job(self.systemd.start, name) for name in starts))
        return {name for name, retry in zip(starts, results, strict=True) if retry}

    async def _each(
        self, action: Callable[[list[str]], Awaitable[None]], names: list[str], what: str
    ) -> None:
        """`action` on all names at once; if that fails, one by one to set aside only the culprits."""
        try:
            await action(names)
            return
        except Exception as error:
            if isinstance(error, SystemdError) and error.error_name == DISCONNECTED:
                raise  # systemd is away, not one unit's fault: the whole pass is retried
            if len(names) == 1:
                self._quarantine(names[0], f"cannot {what} it: {error}")
                return
        for name in names:
            await self._each(action, [name], what)

    async def _job(self, action: Callable[[str], Awaitable[str]], name: str) -> bool:
        """Run a start or stop job; True if it should be tried again on the next pass."""
        try:
            result = await action(name)
        except SystemdError as error:
            # One unit systemd refuses (a bad setting, say) must not hold up the others; its
            # published state shows systemd's reason.
            log.warning("%s %s: %s", action.__name__, name, error)
            return error.error_name == DISCONNECTED
        except Exception as error:
            self._quarantine(name, f"cannot {action.__name__} it: {error}")
            return False
        if action == self.systemd.start:
            self.events.start_done(name, result)
        if result != "done":
            log.warning("%s %s: %s", action.__name__, name, result)
        return False

    def _heartbeat_lost(self) -> bool:
        return self._clock() - self._renewed_at > self.ttl * FENCE_AFTER

    async def _fence_watch(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 20)
            if self._heartbeat_lost():
                await self._fence()

    async def _fence(self) -> None:
        """Stop the fenced units that run, before the machine record can expire."""
        candidates = sorted(self._fence_units - self._fenced)
        if not candidates:
            return
        states = await self.systemd.unit_states(candidates)
        names = [n for n in candidates if states[n][1] in RUNNING]
        if not names:
            return
        log.warning(
            "agent: heartbeat not renewed for %.1fs (TTL %.0fs): stopping fenced units %s",
            self._clock() - self._renewed_at,
            self.ttl,
            names,
        )
        self._fenced.update(names)
        if self._started is not None:
            self._started -= set(names)  # so the next pass starts them again
        await asyncio.gather(*(self._job(self.systemd.stop, name) for name in names))

    def _renewed(self, sent: float) -> None:
        self._renewed_at = max(self._renewed_at, sent)
        if self._fenced and not self._heartbeat_lost():
            log.warning("agent: heartbeat renewed; starting fenced units %s again", sorted(self._fenced))
            self._fenced.clear()
            # The schedule watch may sleep through a partition: read the schedule now.
            self._resync = asyncio.ensure_future(self._reconcile_now())

    async def _reconcile_now(self) -> None:
        try:
            await self.reconcile(await self.registry.assignments(self.machine.id))
        except (StoreError, SystemdError) as error:
            log.warning("reconcile after the heartbeat came back failed (the watch retries): %s", error)
        except Exception:
            log.exception("reconcile after the heartbeat came back crashed (the watch retries)")

    def _on_state_change(self, name: str, load: str, active: str, sub: str) -> None:
        if name in self._assigned and name not in self._quarantined:
            self.events.unit_state(name, active, sub)
            self._states[name] = (load, active, sub)
            self._follow_health(name, active)
            self._to_publish[name] = (load, active, sub)
            self._publish_wanted.set()

    def _follow_health(self, name: str, active: str) -> None:
        """Check a unit with a health check while it is active; each activation starts over."""
        found = self._checks.get(name)
        current = found is not None and found[0] == self._assigned[name].hash  # not the old content's
        if not current or active != "active":
            self.health_monitor.unwatch(name)
            self._health.pop(name, None)
            return
        if self.health_monitor.watching(name):
            return
        digest, check, context = found  # type: ignore[misc]
        if name not in self._last_health:
            # A restarted fleetd goes on counting from what it published before.
            published = (self._published or {}).get(name)
            adopted = published is not None and published.hash == digest and published.health is not None
            self._last_health[name] = published.health if adopted else STARTING  # type: ignore[assignment,union-attr]
        last = self._last_health[name]
        self._health[name] = Health(STARTING.status, 0, last.restarts, last.message)
        self.health_monitor.watch(name, check, context)

    async def _on_health_result(
        self, name: str, check: HealthCheck, ok: bool, message: str, in_start_period: bool
    ) -> None:
        before = self._health.get(name)
        if before is None:
            return  # it stopped meanwhile
        after, restart = judge(check, before, ok, message, in_start_period)
        if after == before:
            return
        self._health[name] = self._last_health[name] = after
        if after.status != before.status:
            self.events.health(name, before.status, after, check, restart)
        if name in self._states:
            self._to_publish[name] = self._states[name]
            self._publish_wanted.set()
        if restart:
            await self._restart_unhealthy(name)

    async def _restart_unhealthy(self, name: str) -> None:
        """Stop and start a unit its health check found failing, if it is still ours to run."""
        async with self._reconciling:
            assignment = self._assigned.get(name)
            if assignment is None or assignment.desired_state != "launched" or name in self._quarantined:
                return
            if name in self._fence_units and self._heartbeat_lost():
                return  # the fence holds it stopped until the heartbeat is back
            log.warning("agent: restarting %s: its health check failed", name)
            # Counted once made, so a published unhealthy state with M restarts is one that
            # failed after all M (HealthCheckMoveAfter), never one whose Mth restart is under way.
            if (last := self._last_health.get(name)) is not None:
                self._last_health[name] = dataclasses.replace(last, restarts=last.restarts + 1)
            await self._job(self.systemd.stop, name)
            await self._job(self.systemd.start, name)

    async def _remove_states(self, names: set[str]) -> None:
        if not names:
            return
        batch = self.registry.batch()
        for name in sorted(names):
            batch.remove_state(name, self.machine.id)
        async with self._state_writes:
            try:
                await self.registry.apply(batch)
                for name in names:
                    self._published.pop(name, None)
            except StoreError as error:
                log.warning(
                    "cannot remove the states of %s (next pass retries): %s", ", ".join(sorted(names)), error
                )

    async def _publish_states(self) -> None:
        while True:
            await self._publish_wanted.wait()
            self._publish_wanted.clear()
            batch, self._to_publish = self._to_publish, {}
            states = await self._records(batch)
            changed = [s for s in states if (self._published or {}).get(s.unit) != s]
            async with self._state_writes:
                written = await self._write_states(changed)
            if not written:
                await asyncio.sleep(OUTAGE_PAUSE)

    async def _records(self, states: dict[str, State]) -> list[UnitState]:
        """The records to publish, with systemd's reason where a unit failed or cannot load
        (asked for all such units at once; the others need no call)."""
        failing = [
            name
            for name, (load, active, _) in states.items()
            if name in self._assigned
            and name not in self._quarantined
            and (active == "failed" or load not in ("loaded", "not-found"))
        ]
        reasons = dict(zip(failing, await asyncio.gather(*map(self._failure_reason, failing)), strict=True))
        records = []
        for name, (load, active, sub) in states.items():
            assignment = self._assigned.get(name)
            if assignment is None:
                continue
            reason = self._quarantined.get(name) or reasons.get(name, "")
            health = self._health.get(name) if active == "active" else None
            records.append(
                UnitState(name, self.machine.id, assignment.hash, load, active, sub, reason, health)
            )
        return records

    async def _failure_reason(self, name: str) -> str:
        try:
            return await self.systemd.failure_reason(name)
        except SystemdError as error:
            return f"systemd did not say why: {error}"

    async def _write_states(self, states: list[UnitState]) -> bool:
        """Every state seen since the last write, in one batch: one transaction on etcd v3."""
        # Unassigned while we read them: their states go, not come.
        states = [s for s in states if s.unit in self._assigned]
        batch = self.registry.batch()
        for state in states:
            batch.publish_state(state)
        try:
            await self.registry.apply(batch)
        except StoreError as error:
            log.warning("cannot publish the states of %s: %s", ", ".join(s.unit for s in states), error)
            for state in states:
                self._to_publish.setdefault(
                    state.unit, (state.load_state, state.active_state, state.sub_state)
                )
            self._publish_wanted.set()
            return False
        if self._published is not None:
            self._published.update({s.unit: s for s in states})
        return True


def _constraints(words: list[str]) -> list[Constraint]:
    """The engine's list, each word read as a unit's; one that cannot be read is left out."""
    constraints = []
    for word in words:
        try:
            constraints.append(parse_constraint(word))
        except ValueError as error:
            log.warning("agent: ignoring asked fact %r: %s", word, error)
    return constraints
