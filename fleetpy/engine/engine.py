"""The engine loop: win the leader lease, then turn registry changes into schedule changes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence

from fleetpy.conf import metrics
from fleetpy.engine.cordon import drained, hand_over
from fleetpy.engine.guarded import plan_guarded
from fleetpy.engine.health import avoided_machines, new_avoidances, stale_avoidances, worth_noting
from fleetpy.engine.scheduler import Plan
from fleetpy.events import EngineEvents
from fleetpy.registry import (
    Assignment,
    Avoidance,
    HistoryLost,
    Job,
    NoQuorum,
    Registry,
    StoreError,
    Unavailable,
    UnitState,
    VolumeRecord,
    moves,
)
from fleetpy.registry.mirror import Mirror, MirrorStore
from fleetpy.unit import Unit, UnitFile, load_unit

log = logging.getLogger(__name__)

WATCH_TIMEOUT = 300.0
OUTAGE_PAUSE = 1.0
# How long a resigning leader waits for etcd to take its lease back before it stops anyway.
RESIGN_TIMEOUT = 1.0
# While units hand over from a drained machine, how often to look whether their new copies run.
HANDOVER_POLL = 0.5
# A leader writes the schedule only while at least this share of its lease is surely left (counted
# from when it sent its last renewal). Less means its renewals are late: its process stalled, or
# etcd is slow, and a write could land after the lease expired and another engine took over.
LEASE_MARGIN = 1 / 3
# What a plan reads ("*": everything, after the mirror listed the registry again). The schedule,
# pending reasons and avoided machines are the engine's own writes; events it does not plan
# from, and of the states only those that call for a move (engine.health.worth_noting).
PLANNED_FROM = frozenset({"*", "job", "machines", "machine-metadata", "cordon", "volumes", "state"})
NOT_MIRRORED = ("state", "events")


class LeaseUncertain(Exception):
    """The leader cannot be sure it still holds the lease: it must not write."""


class ParsedUnits:
    """Jobs with their parsed units. Unit files are immutable, so parses are kept by (name, hash),
    and each file is read (all new ones in one registry read) and parsed once per hash, however
    many units share it (a template's instances do).

    A job whose unit file is missing or no longer parses is quarantined: kept out of scheduling
    with the reason (cached like a parse), while every other job goes on.
    """

    def __init__(self, registry: Registry):
        self.registry = registry
        self._units: dict[tuple[str, str], Unit | str] = {}  # the unit, or why there is none
        self._files: dict[str, UnitFile | str] = {}  # by hash: the file, or why there is none

    async def of(self, jobs: list[Job]) -> list[tuple[Job, Unit]]:
        return (await self.split(jobs))[0]

    async def split(self, jobs: list[Job]) -> tuple[list[tuple[Job, Unit]], dict[str, str]]:
        """The jobs whose units parse, and the quarantined ones with why."""
        unread = {j.hash for j in jobs if (j.name, j.hash) not in self._units and j.hash not in self._files}
        if unread:
            self._files.update(await self.registry.unit_files(unread))  # etcd away: an outage
        parsed, quarantined = [], {}
        for job in jobs:
            key = (job.name, job.hash)
            if key not in self._units:
                self._units[key] = self._load(job)
            unit = self._units[key]
            if isinstance(unit, str):
                quarantined[job.name] = unit
            else:
                parsed.append((job, unit))
        # Forget destroyed and replaced units, or the cache would grow with every submit.
        live = {(job.name, job.hash) for job in jobs}
        self._units = {key: unit for key, unit in self._units.items() if key in live}
        hashes = {job.hash for job in jobs}
        self._files = {digest: file for digest, file in self._files.items() if digest in hashes}
        return parsed, quarantined

    def known(self, name: str, digest: str) -> Unit | None:
        """The unit parsed for this job content, if it was (no I/O)."""
        unit = self._units.get((name, digest))
        return None if unit is None or isinstance(unit, str) else unit

    def _load(self, job: Job) -> Unit | str:
        unit_file = self._files[job.hash]
        if isinstance(unit_file, str):
            return f"its {unit_file}"
        try:
            return load_unit(job.name, unit_file)
        except Exception as error:  # noqa: BLE001 - one bad record must not stop the scheduler
            # The API validates on submit; this guards against older or hand-edited records.
            return f"its unit file cannot be read: {error}"


class Engine:
    """One per fleetd; only the one holding the leader lease schedules.

    The leader lists the registry once and keeps a copy current from one prefix watch (a
    `Mirror`): a submit or a machine joining or expiring wakes it within milliseconds, and a
    pass reads the copy, not etcd, so it costs no etcd request but its writes. Those go out in
    batches, and the next pass waits until the copy holds them. Only changes to what a plan
    reads start one; a full pass every `reconcile_interval` still runs as a safety net.
    With `mirrored=False` every pass reads the registry again instead (the benchmark's
    baseline), woken by watches on each directory.

    A new leader, and any leader right after etcd was away, gives machines one TTL to register
    again before it moves their units: their records may have expired while their agents (and
    units) were fine, as when every fleetd restarts. Its own machine gets the same TTL whenever
    its record is missing: this fleetd runs, so its agent is registering it again (the record
    lapsed while the process stalled).

    A leader that stalled past its lease renewals writes nothing before it has renewed the
    lease, so an engine that lost its lease without noticing never undoes the new leader's work.
    """

    def __init__(
        self,
        registry: Registry,
        machine_id: str,
        lease_ttl: float,
        reconcile_interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        events: EngineEvents | None = None,
        mirrored: bool = True,
    ):
        self.registry = registry
        self.mirrored = mirrored
        self._view = registry  # what passes read: the registry, or its mirror while leading
        self.events = events or EngineEvents(ttl=lease_ttl)
        self.machine_id = machine_id
        self.lease_ttl = lease_ttl
        self.reconcile_interval = reconcile_interval
        self.clock = clock
        self.leading = asyncio.Event()
        self.units = ParsedUnits(registry)
        self._leading_since = -float("inf")  # by self.clock
        self._lease_until = -float("inf")  # by self.clock: until then the lease is surely ours
        self._own_missing_since: float | None = None  # by self.clock: when our record was missed
        self._grace_left = 0.0  # seconds until held units may move; 0 when none are held
        self._quarantined: dict[str, str] = {}  # as of the last pass, to log each one once
        self._handing_over: set[str] = set()  # units whose old copy waits for the new one
        # Machines not told of their volume moves' last steps, by when this leader first saw it.
        self._untold: dict[moves.Untold, float] = {}
        self._asked_facts: list[str] | None = None  # as last written by this leader
        self._mirror: Mirror | None = None  # while leading, mirrored
        # States whose restarts reached HealthCheckMoveAfter, noted by the mirror, until a pass
        # has written what they call for.
        self._noted: dict[tuple[str, str], UnitState] = {}
        self._failing = False  # the latest etcd request failed
        self._paused_since: float | None = None  # by time.monotonic: since scheduling paused

    async def run(self) -> None:
        while True:
            try:
                sent = self.clock()
                acquired = await self.registry.acquire_leadership(self.machine_id, self.lease_ttl)
                self._etcd_answered()
                if acquired:
                    self._lease_until = sent + self.lease_ttl
                    log.info("engine: this machine leads (%s)", self.machine_id)
                    self.events.leading(self.machine_id)
                    if not await self._lead():
                        # Let another fleetd take the lease; it may be able to schedule.
                        await asyncio.sleep(self.lease_ttl)
                else:
                    await self._await_vacancy()
            except StoreError as error:
                await self._outage("engine", error)

    async def _await_vacancy(self) -> None:
        index = await self.registry.index()
        if await self.registry.leader() is not None:
            await self.registry.wait(index, "engine", timeout=self.lease_ttl)

    async def _lead(self) -> bool:
        """Schedule until the lease is lost (True) or scheduling fails (False); then resign."""
        self.leading.set()
        self._leading_since = self.clock()
        self._untold = {}
        lease = asyncio.create_task(self._keep_lease())
        if self.mirrored:
            mirror = Mirror(
                self.registry.store, self.registry.prefix, skip=NOT_MIRRORED, note=self._note_state
            )
            self._mirror = mirror
            workers = [asyncio.create_task(mirror.run()), asyncio.create_task(self._schedule_from(mirror))]
        else:
            changed = asyncio.Event()
            changed.set()
            workers = [
                asyncio.create_task(coro)
                for coro in (
                    self._watch("job", changed),
                    self._watch("machines", changed),
                    self._watch("machine-metadata", changed),
                    self._watch("cordon", changed),
                    self._schedule_on(changed),
                )
            ]
        try:
            await asyncio.wait([lease, *workers], return_when=asyncio.FIRST_COMPLETED)
            for task in workers:
                if task.done() and task.exception() is not None:
                    log.error(
                        "engine: scheduling failed; giving up the leader lease",
                        exc_info=task.exception(),
                    )
                    return False
            return True
        finally:
            # Also on cancellation (fleetd stopping): clean up and resign at once, so the next
            # engine need not wait out our lease.
            self.leading.clear()
            self._mirror, self._noted = None, {}
            for task in (lease, *workers):
                task.cancel()
            await asyncio.gather(lease, *workers, return_exceptions=True)
            self._use(self.registry)
            with contextlib.suppress(StoreError, TimeoutError):
                async with asyncio.timeout(RESIGN_TIMEOUT):
                    await self.registry.resign(self.machine_id)

    def _note_state(self, key: str, text: str) -> bool:
        """Whether a unit state the mirror skips may call for a move (see engine.health)."""
        return key.startswith(self.registry.key("state", "")) and worth_noting(text, self.units.known)

    def _use(self, view: Registry) -> None:
        self._view = view
        self.units = ParsedUnits(view)

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            if not await self._renew():
                return

    async def _renew(self) -> bool:
        """Renew the leader lease; False when it is lost or etcd cannot say."""
        sent = self.clock()
        try:
            if not await self.registry.renew_leadership(self.machine_id, self.lease_ttl):
                log.warning("engine: lost the leader lease")
                return False
        except StoreError as error:
            log.warning("engine: cannot renew lease: %s", error)
            return False
        # etcd counts the TTL from when it takes the renewal, which is after we sent it.
        self._lease_until = max(self._lease_until, sent + self.lease_ttl)
        return True

    def _lease_is_sure(self) -> bool:
        return self.clock() + self.lease_ttl * LEASE_MARGIN < self._lease_until

    async def _watch(self, directory: str, changed: asyncio.Event) -> None:
        index = None
        while True:
            try:
                if index is None:
                    index = await self.registry.index()
                if await self.registry.wait(index, directory, timeout=WATCH_TIMEOUT) is not None:
                    # Skip to now: the pass this triggers reads everything up to here anyway.
                    index = None
                    changed.set()
            except HistoryLost:
                index = None
                changed.set()
            except StoreError as error:
                await self._outage(f"watch on {directory}", error)

    async def _schedule_from(self, mirror: Mirror) -> None:
        """Plan from the mirror: when what a plan reads changed, or when a timer is due."""
        while not mirror.synced:
            await mirror.changed(self.lease_ttl)
        self._use(Registry(MirrorStore(mirror), self.registry.prefix))
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            # Changes that arrive while a pass runs are planned together in the next one.
            if loop.time() < due and not await self._worth_a_pass(mirror, due - loop.time()):
                continue
            done = await self._pass()
            if done is False:
                return  # the lease is gone: _lead resigns, and another engine schedules
            due = loop.time() + (self._next_pass() if done else 0.0)

    @staticmethod
    async def _worth_a_pass(mirror: Mirror, timeout: float) -> bool:
        """Whether something a plan reads changed within `timeout` (False also when it ran out)."""
        return bool(await mirror.changed(timeout) & PLANNED_FROM)

    def _next_pass(self) -> float:
        """Seconds until a pass is due without any change."""
        # While units are held for missing machines, look again when their grace ends.
        timeout = min(self.reconcile_interval, self._grace_left or self.reconcile_interval)
        if self._untold:
            # Look again when the first untold machine is due to be told.
            due = min(self._untold.values()) + moves.RING_AFTER - self.clock()
            timeout = min(timeout, max(due, 0.1))
        if self._handing_over:
            timeout = min(timeout, HANDOVER_POLL)
        return timeout

    async def _schedule_on(self, changed: asyncio.Event) -> None:
        while True:
            # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow a cancellation that
            # arrives just as the event is set, and then _lead would wait for this task for ever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._next_pass()):
                    await changed.wait()
            changed.clear()
            done = await self._pass()
            if done is False:
                return  # the lease is gone: _lead resigns, and another engine schedules
            if done is None:
                changed.set()

    async def _pass(self) -> bool | None:
        """One pass as the leader: True when done, None when it must run again at once (what
        it read may be stale, or etcd was away), False when the lease is gone."""
        try:
            await self.reconcile(check_lease=True)
            self._etcd_answered()
            return True
        except LeaseUncertain:
            log.warning(
                "engine: lease renewal overdue (%.1fs of %.0fs left); renewing before writing",
                max(self._lease_until - self.clock(), 0.0),
                self.lease_ttl,
            )
            return None if await self._renew() else False
        except StoreError as error:
            await self._outage("reconcile", error)
            return None

    async def _outage(self, what: str, error: StoreError) -> None:
        """Log a failed etcd request once it is an outage, and pause before the next try.

        A first failure may be a blip (a watch stream broke as its etcd member went away, and
        the next try on another member works); a second in a row, or etcd's members saying they
        lost their quorum, pauses scheduling, which is logged once until etcd answers again."""
        known = self.registry.outage()  # the store's account, which may say more than `error`
        why = known if isinstance(known, NoQuorum) else error
        if not isinstance(error, Unavailable):
            log.warning("engine: %s: %s", what, error)
        elif self._paused_since is None and (self._failing or isinstance(why, NoQuorum)):
            self._paused_since = time.monotonic()
            log.warning(
                "engine: scheduling paused: %s; units already running keep running, and scheduling "
                "resumes when etcd answers again",
                why,
            )
        else:
            log.info("engine: %s: %s", what, error)
        self._failing = isinstance(error, Unavailable)
        await asyncio.sleep(OUTAGE_PAUSE)

    def _etcd_answered(self) -> None:
        self._failing = False
        if self._paused_since is not None:
            paused, self._paused_since = time.monotonic() - self._paused_since, None
            log.warning("engine: etcd answers again after %.1fs; scheduling resumes", paused)

    def _grace(self, last_failure: float) -> float:
        """Seconds left in which missing machines may still register again."""
        since_leading = self._leading_since + self.lease_ttl - self.clock()
        # last_failure is the store's time.monotonic, not our clock.
        since_outage = last_failure + self.lease_ttl - time.monotonic()
        return max(since_leading, since_outage, 0.0)

    def _own_grace(self, missing: set[str]) -> float:
        """Seconds left in which this machine's own lapsed record may still come back."""
        if self.machine_id not in missing:
            self._own_missing_since = None
            return 0.0
        if self._own_missing_since is None:
            self._own_missing_since = self.clock()
        return max(self._own_missing_since + self.lease_ttl - self.clock(), 0.0)

    async def reconcile(self, *, check_lease: bool = False) -> Plan:
        """Read the cluster, compute the plan, and write only the difference.

        Units the engine must not touch now are held: left where they are, with their
        assignments as they are. Those are units on machines still within their grace, and
        quarantined units (unreadable, or failing the scheduler) already assigned somewhere.
        With `check_lease` (the leader's loop), raises LeaseUncertain instead of writing when
        the lease may have expired.
        """
        started = time.perf_counter()
        view = self._view
        machines, jobs, current, pending, last_failure, volume_records, avoidances = await asyncio.gather(
            view.machines(),
            view.jobs(),
            view.assignments(),
            view.pending(),
            view.last_failure(),
            view.volume_records(),
            view.avoided(),
        )
        volumes = moves.where(volume_records)[0]
        moving = await self._volume_moves(volume_records, machines, check_lease)
        parsed, quarantined = await self.units.split(jobs)
        # A job record that cannot be read at all is quarantined the same way, under its key.
        quarantined |= {p.removeprefix("job/"): r for p, r in view.unreadable.items() if p.startswith("job/")}
        held = {a.unit for a in current if a.unit in quarantined}
        missing = {a.machine_id for a in current} - {m.id for m in machines}
        grace = self._grace(last_failure) if missing else 0.0
        own_grace = self._own_grace(missing)
        self._grace_left = max(grace, own_grace)
        if grace:
            log.info(
                "engine: %d machine(s) missing just after a leader change or etcd outage; "
                "their units stay for %.1fs",
                len(missing),
                grace,
            )
            held |= {a.unit for a in current if a.machine_id in missing}
        elif own_grace:
            log.info(
                "engine: this machine's own record lapsed (a stall?); its units stay for %.1fs",
                own_grace,
            )
            held |= {a.unit for a in current if a.machine_id == self.machine_id}
        current = [a for a in current if a.unit not in held]
        states = await self._unhealthy_states(parsed)
        fresh = new_avoidances(states, current, {j.name: (j, u) for j, u in parsed}, avoidances)
        avoided = avoided_machines([*avoidances, *fresh], jobs)
        new_plan, failed = plan_guarded(
            machines,
            [(j, u) for j, u in parsed if j.name not in held],
            current,
            volumes=volumes,
            avoided=avoided,
            moving=moving,
        )
        for name, error in failed.items():
            quarantined[name] = f"the scheduler fails on it: {type(error).__name__}: {error}"
        self._log_quarantine(quarantined, failed)
        held |= {a.unit for a in current if a.unit in failed}
        current = [a for a in current if a.unit not in held]
        reasons = {**{unit: str(reason) for unit, reason in new_plan.pending.items()}, **quarantined}
        assignments, self._handing_over = await self._hand_over(new_plan, machines, parsed, current)
        reasons = {u: r for u, r in reasons.items() if u not in held or u in quarantined}
        pending = {u: r for u, r in pending.items() if u not in held or u in quarantined}
        if check_lease and not self._lease_is_sure():
            raise LeaseUncertain()
        await self._avoid(fresh, stale_avoidances(avoidances, jobs))
        await self.apply(assignments, reasons, current, pending)
        self._noted.clear()
        await self._ask_facts(new_plan, parsed)
        self.events.scheduled(machines, current, assignments, new_plan.decisions, reasons, pending)
        metrics.SCHEDULING_SECONDS.observe(time.perf_counter() - started)
        await self.events.expire_histories({m.id for m in machines})
        return new_plan

    async def _unhealthy_states(self, parsed: list[tuple[Job, Unit]]) -> list[UnitState]:
        """The states that may call for a move: those the mirror noted, or (re-reading, without
        a mirror) every state, read only while some unit has HealthCheckMoveAfter."""
        if self._mirror is None:
            if any(u.fleet.health is not None and u.fleet.health.move_after for _, u in parsed):
                return await self._view.states()
            return []
        for key, text in self._mirror.take_noted().items():
            try:
                state = UnitState.from_json(json.loads(text))
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                log.warning("engine: cannot read the state %s: %s", key, error)
                continue
            self._noted[(state.unit, state.machine_id)] = state
        return list(self._noted.values())

    async def _avoid(self, fresh: list[Avoidance], stale: list[Avoidance]) -> None:
        """Record the machines units now avoid, and forget the avoidances that no longer hold."""
        batch = self._view.batch()
        for a in stale:
            batch.unavoid(a.unit, a.machine_id)
        for a in fresh:
            log.warning(
                "engine: moving %s off %s: its health check failed after %d restarts there: %s",
                a.unit,
                a.machine_id,
                a.restarts,
                a.message,
            )
            batch.avoid(a)
        await self._view.apply(batch)

    async def _volume_moves(
        self, records: dict[str, VolumeRecord], machines: list, check_lease: bool
    ) -> dict[str, tuple[str, str]]:
        """The volumes moving (source, target), whose units run nowhere meanwhile. A move whose
        source or target machine is gone is failed here (once a new leader's grace is over: the
        machine may only be registering again), so its units go back to the source. A machine
        left untold of its move's last step is told (see _tell)."""
        alive = [m.id for m in machines]
        stranded = moves.stranded(records, alive)
        if stranded and self.clock() - self._leading_since < self.lease_ttl:
            stranded = {}
        for name, (move, reason) in stranded.items():
            if check_lease and not self._lease_is_sure():
                raise LeaseUncertain()
            now = time.time()
            after = await self.registry.update_volume(name, moves.failed(move, reason, now))
            if after is not None and after.move == moves.failed_move(move, reason, now):
                self.events.volume_move_failed(name, move, reason)
        await self._tell({n: r for n, r in records.items() if n not in stranded}, alive, check_lease)
        return {name: move for name, move in moves.where(records)[1].items() if name not in stranded}

    async def _tell(self, records: dict[str, VolumeRecord], alive: list[str], check_lease: bool) -> None:
        """Ring the doorbells of machines left untold of a move's step for RING_AFTER: a fleetd
        on etcd v2 stopped between the step and its doorbells, or the move began under fleetds
        that rang none (before volume-moves/ existed). Without this such a move would wait for
        ever; with it, it goes on."""
        if not any(record.move is not None for record in records.values()):
            self._untold = {}
            return
        now = self.clock()
        found = moves.untold(records, await self._view.all_volume_doorbells(), alive)
        self._untold = {u: self._untold.get(u, now) for u in found}
        for untold, since in self._untold.items():
            if now - since < moves.RING_AFTER:
                continue
            if check_lease and not self._lease_is_sure():
                raise LeaseUncertain()
            if await self.registry.ring_volume_doorbell(
                untold.machine_id, untold.name, untold.text, untold.seen
            ):
                log.warning(
                    "engine: machine %s was not told of volume %s's move for %.0fs; rang its doorbell",
                    untold.machine_id,
                    untold.name,
                    now - since,
                )

    async def _ask_facts(self, new_plan: Plan, parsed: list[tuple[Job, Unit]]) -> None:
        """Tell the agents which facts pending units wait on (written only when that changes)."""
        asked = sorted(
            {str(c) for job, unit in parsed if job.name in new_plan.pending for c in unit.fleet.constraints}
        )
        if asked != self._asked_facts:
            await self.registry.set_asked_facts(asked)
            self._asked_facts = asked

    async def _hand_over(
        self, new_plan: Plan, machines: list, parsed: list[tuple[Job, Unit]], current: list[Assignment]
    ) -> tuple[list[Assignment], set[str]]:
        """The plan, with the copies on drained machines kept until their new copies run."""
        closed = {m.id for m in machines if drained(m)}
        if not any(a.machine_id in closed for a in current):
            return list(new_plan.assignments), set()
        states = {(s.unit, s.machine_id): s for s in await self.registry.states()}
        return hand_over(new_plan.assignments, current, states, machines, {j.name: u for j, u in parsed})

    def _log_quarantine(self, quarantined: dict[str, str], failed: dict[str, Exception]) -> None:
        """Log each quarantine once, when it starts (with the traceback of a scheduler failure)."""
        for name, reason in quarantined.items():
            if self._quarantined.get(name) != reason:
                log.error("engine: quarantined %s: %s", name, reason, exc_info=failed.get(name))
        self._quarantined = quarantined

    async def apply(
        self,
        assignments: Sequence[Assignment],
        reasons: dict[str, str],
        current: list[Assignment],
        pending: dict[str, str],
    ) -> None:
        """Write the difference: `assignments` and pending `reasons` wanted, `current` and
        `pending` as stored."""
        wanted = {(a.unit, a.machine_id): a for a in assignments}
        existing = {(a.unit, a.machine_id): a for a in current}
        removals = self._view.batch()
        for unit, machine_id in existing.keys() - wanted.keys():
            # Its state/ key is the agent's to remove (one writer per key).
            removals.unassign(unit, machine_id)
        # Unassign before assigning, so Conflicts/Replaces never see both copies at once.
        # Each batch is one transaction per 128 writes on etcd v3.
        await self._view.apply(removals)
        additions = self._view.batch()
        # Machine by machine: each transaction then holds whole schedules of a few machines,
        # so an agent is woken once for all its new units, not once per transaction.
        for key, assignment in sorted(wanted.items(), key=lambda item: (item[0][1], item[0][0])):
            if existing.get(key) != assignment:
                additions.assign(assignment)
        for unit, reason in reasons.items():
            if pending.get(unit) != reason:
                additions.set_pending(unit, reason)
        for unit in pending.keys() - reasons.keys():
            additions.set_pending(unit, None)
        await self._view.apply(additions)
        if changed := len(removals) + sum(existing.get(k) != a for k, a in wanted.items()):
            log.info("engine: %d schedule changes", changed)
