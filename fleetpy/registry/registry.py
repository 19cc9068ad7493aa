"""The cluster state in a key-value store: one key layout (docs/registry.md), JSON records."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

from fleetpy.conf import metrics
from fleetpy.registry import moves
from fleetpy.registry.groups import SubmitGroups
from fleetpy.registry.memory import MemoryStore
from fleetpy.registry.models import Assignment, Avoidance, Event, Job, Machine, UnitState, VolumeRecord
from fleetpy.registry.store import (
    AlreadyExists,
    CompareFailed,
    Delete,
    Listing,
    Op,
    PartlyWritten,
    Put,
    Store,
    Unavailable,
)
from fleetpy.unit import UnitFile

SCHEMA_VERSION = "1"
DEFAULT_PREFIX = "/_fleetpy/"

log = logging.getLogger(__name__)
_Record = TypeVar("_Record")
_Class = TypeVar("_Class", bound=type)
# The metrics' `call` label of batch writes (Registry.apply), by what they write.
WRITE_SCHEDULE = "write_schedule"  # the engine's schedule and pending reasons
WRITE_STATES = "write_states"  # an agent's unit states
# Compare-and-swap rounds before a writer that keeps losing gives up.
CAS_ATTEMPTS = 20


class NotFound(LookupError):
    pass


class Conflict(Exception):
    """The record changed under us or already exists."""


class Batch:
    """Schedule, pending and state writes collected to go to etcd together (`Registry.apply`).

    At most one write per key: a later write to a key replaces the earlier one.
    """

    def __init__(self, prefix: str):
        self._prefix = prefix
        self._ops: dict[str, Op] = {}
        self._writes: set[str] = set()  # what it writes, for the metrics' `call` label

    def _key(self, *parts: str) -> str:
        return self._prefix + "/".join(parts)

    def _add(self, op: Op, writes: str) -> Batch:
        self._ops.pop(op.key, None)
        self._ops[op.key] = op
        self._writes.add(writes)
        return self

    @property
    def call(self) -> str:
        """What the batch writes, as the metrics name it: write_schedule, write_states or both."""
        return "+".join(sorted(self._writes))

    @property
    def ops(self) -> list[Op]:
        return list(self._ops.values())

    def __len__(self) -> int:
        return len(self._ops)

    def assign(self, assignment: Assignment) -> Batch:
        key = self._key("schedule", assignment.machine_id, assignment.unit)
        return self._add(Put(key, json.dumps(assignment.to_json())), WRITE_SCHEDULE)

    def unassign(self, unit: str, machine_id: str) -> Batch:
        return self._add(Delete(self._key("schedule", machine_id, unit)), WRITE_SCHEDULE)

    def set_pending(self, unit: str, reason: str | None) -> Batch:
        key = self._key("pending", unit)
        return self._add(Delete(key) if reason is None else Put(key, reason), WRITE_SCHEDULE)

    def avoid(self, avoidance: Avoidance) -> Batch:
        key = self._key("avoid", avoidance.unit, avoidance.machine_id)
        return self._add(Put(key, json.dumps(avoidance.to_json())), WRITE_SCHEDULE)

    def unavoid(self, unit: str, machine_id: str) -> Batch:
        return self._add(Delete(self._key("avoid", unit, machine_id)), WRITE_SCHEDULE)

    def publish_state(self, state: UnitState) -> Batch:
        key = self._key("state", state.unit, state.machine_id)
        return self._add(Put(key, json.dumps(state.to_json())), WRITE_STATES)

    def remove_state(self, unit: str, machine_id: str) -> Batch:
        return self._add(Delete(self._key("state", unit, machine_id)), WRITE_STATES)


def _named_call(name: str, method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(method)
    async def call(*args: Any, **kwargs: Any) -> Any:
        if metrics.REGISTRY_CALL.get():  # part of an outer registry call, which names it
            return await method(*args, **kwargs)
        token = metrics.REGISTRY_CALL.set(name)  # not registry_call(): this is on every request's path
        try:
            return await method(*args, **kwargs)
        finally:
            metrics.REGISTRY_CALL.reset(token)

    return call


def _calls_named(cls: _Class) -> _Class:
    """Every public coroutine method names the etcd requests it makes after itself (the `call`
    label of fleetpy_etcd_request_seconds), so etcd's time shows per fleetd activity; `apply`
    names them after what its batch writes."""
    for name, method in list(vars(cls).items()):
        if not name.startswith("_") and name != "apply" and inspect.iscoroutinefunction(method):
            setattr(cls, name, _named_call(name, method))
    return cls


@_calls_named
class Registry:
    """Everything fleetd and the API read and write in etcd, and nothing else.

    Keys (relative to the prefix), each written by one party:
      version                      schema version                    first fleetd
      machines/<id>                Machine JSON, with the agent TTL  that machine's agent
      machine-metadata/<id>        metadata edits laid over it       API (PATCH /machines)
      cordon/<id>                  the machine is drained            API (fleetctl drain)
      unit/<hash>                  unit file text, content-addressed API (submit)
      job/<name>                   Job JSON: hash + desired state    API
      schedule/<machine>/<name>    Assignment JSON                   engine
      pending/<name>               why a unit fits nowhere           engine
      avoid/<name>/<machine>       Avoidance JSON: the unit failed   engine (until the unit is
                                   its health check there after      destroyed or gets new
                                   HealthCheckMoveAfter restarts     content)
      asked-facts                  the MachineConstraints of pending engine (agents watch it to
                                   units, JSON list of words         publish a fact that crosses one)
      state/<name>/<machine>       UnitState JSON                    that machine's agent
      engine/leader                machine id of the engine, TTL     the elected engine
      volumes/<name>               machine id the local volume lives the agent that made it (created
                                   on; JSON with its last move once  once; the API forgets it); a move's
                                   it moved                          steps by compare-and-swap: API,
                                                                     source and target agents, engine
      volume-moves/<machine>/<name> the volume's record as a step of  written with each step, in its
                                   its move left it: that machine's  transaction (v2: right after it);
                                   doorbell (it watches only these)  deleted by that machine's agent
                                                                     once its part is over
      events/<machine>             that fleetd's recent events, JSON that machine's event recorder
                                   (the leader removes it once the machine is gone for long)
    """

    def __init__(self, store: Store, prefix: str = DEFAULT_PREFIX):
        self.store = store
        self.prefix = "/" + prefix.strip("/") + "/"
        # Records a listing could not read, by their path under the prefix, with why: kept out of
        # every listing (one bad record must not stop a reader) and shown by whoever owns them.
        self.unreadable: dict[str, str] = {}
        # Submits that arrive together share a transaction where a batch is all-or-nothing.
        self._submits = SubmitGroups(store.apply) if store.atomic_batches else None

    async def _records(self, directory: str, parse: Callable[[dict], _Record]) -> list[_Record]:
        """The records under `directory` that parse, in key order; the others go to `unreadable`."""
        return (await self._records_at(directory, parse))[0]

    async def _records_at(
        self, directory: str, parse: Callable[[dict], _Record]
    ) -> tuple[list[_Record], int]:
        """`_records`, and the store's index when they were read."""
        texts = await self._list(directory)
        before = {p: r for p, r in self.unreadable.items() if p.startswith(directory + "/")}
        for path in before:
            del self.unreadable[path]
        records = []
        for key, text in sorted(texts.items()):
            path = f"{directory}/{key}"
            try:
                records.append(parse(json.loads(text)))
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                reason = f"its record {self.prefix}{path} cannot be read ({type(error).__name__}: {error})"
                if before.get(path) != reason:
                    log.error("registry: skipping %s", reason)
                self.unreadable[path] = reason
        return records, texts.index

    def key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    async def _list(self, *parts: str) -> Listing:
        """Records under a directory, by their path relative to it."""
        base = self.key(*parts) + "/"
        listing = await self.store.list(base)
        return Listing({k[len(base) :]: v for k, v in listing.items()}, listing.index)

    async def ensure_schema(self) -> None:
        try:
            await self.store.put(self.key("version"), SCHEMA_VERSION, create_only=True)
        except AlreadyExists:
            found = await self.store.get(self.key("version"))
            if found != SCHEMA_VERSION:
                raise RuntimeError(
                    f"registry at {self.prefix} has schema version {found}, this fleetd "
                    f"speaks {SCHEMA_VERSION}; use another --etcd-key-prefix or upgrade"
                ) from None

    # Several writes at once: one transaction per 128 on v3, concurrent requests on v2.
    def batch(self) -> Batch:
        return Batch(self.prefix)

    async def apply(self, batch: Batch) -> None:
        if batch:
            with metrics.registry_call(batch.call):
                await self.store.apply(batch.ops)

    async def submit(self, unit_file: UnitFile, job: Job, *, replace: bool = False) -> None:
        """A unit's file and its job in one transaction (v3): the file first, so no reader sees
        the job without it. Raises Conflict if the job exists and `replace` is false. Submits
        made while one is written share the next transaction (groups.py)."""
        ops: list[Op] = [
            Put(self.key("unit", unit_file.hash), unit_file.to_text()),
            Put(self.key("job", job.name), json.dumps(job.to_json()), create_only=not replace),
        ]
        try:
            if self._submits is not None:
                await self._submits.submit(job.name, ops)
            else:
                await self.store.apply(ops)
        except AlreadyExists:
            raise Conflict(f"unit {job.name} already exists") from None

    # Unit files: immutable, so readers may cache them by hash forever.
    async def put_unit_file(self, unit_file: UnitFile) -> str:
        digest = unit_file.hash
        with contextlib.suppress(AlreadyExists):
            await self.store.put(self.key("unit", digest), unit_file.to_text(), create_only=True)
        return digest

    async def unit_file(self, digest: str) -> UnitFile | None:
        text = await self.store.get(self.key("unit", digest))
        return None if text is None else UnitFile.parse(text)

    async def unit_files(self, digests: Iterable[str]) -> dict[str, UnitFile | str]:
        """Several unit files in one read (one transaction on etcd v3): each by its hash, or,
        where there is none, why (missing, or its text does not parse)."""
        keys = {self.key("unit", digest): digest for digest in digests}
        texts = await self.store.get_many(list(keys))
        found: dict[str, UnitFile | str] = {}
        for key, digest in keys.items():
            text = texts.get(key)
            if text is None:
                found[digest] = f"unit file {digest} is missing from the registry"
                continue
            try:
                found[digest] = UnitFile.parse(text)
            except Exception as error:  # noqa: BLE001 - one bad record must not fail the others
                found[digest] = f"unit file {digest} cannot be read: {error}"
        return found

    # Jobs: what the user asked for.
    async def create_job(self, job: Job) -> None:
        try:
            await self.store.put(self.key("job", job.name), json.dumps(job.to_json()), create_only=True)
        except AlreadyExists:
            raise Conflict(f"unit {job.name} already exists") from None

    async def job(self, name: str) -> Job | None:
        text = await self.store.get(self.key("job", name))
        return None if text is None else Job.from_json(json.loads(text))

    async def jobs(self) -> list[Job]:
        return await self._records("job", Job.from_json)

    async def set_desired_state(self, name: str, state: str) -> None:
        key = self.key("job", name)
        current = await self.store.get(key)
        if current is None:
            raise NotFound(f"unit {name} not found")
        job = Job.from_json(json.loads(current))
        if job.desired_state == state:
            return
        updated = Job(job.name, job.hash, state)
        try:
            await self.store.put(key, json.dumps(updated.to_json()), prev_value=current)
        except CompareFailed:
            raise Conflict(f"unit {name} changed while being updated; try again") from None

    async def delete_job(self, name: str) -> None:
        if not await self.store.delete(self.key("job", name)):
            raise NotFound(f"unit {name} not found")

    # Machines: each agent's own record, alive while its TTL is refreshed.
    async def register_machine(self, machine: Machine, ttl: float) -> None:
        await self.store.put(self.key("machines", machine.id), json.dumps(machine.to_json()), ttl=ttl)

    async def refresh_machine(self, machine_id: str, ttl: float) -> bool:
        return await self.store.refresh(self.key("machines", machine_id), ttl)

    async def machines(self) -> list[Machine]:
        """Live machines, with any metadata edits laid over what their agents registered."""
        overlays = {}
        for machine_id, text in (await self._list("machine-metadata")).items():
            with contextlib.suppress(ValueError):
                overlay = json.loads(text)
                if isinstance(overlay, dict):  # anything else is not an edit the API wrote: ignored
                    overlays[machine_id] = overlay
        cordoned = (await self._list("cordon")).keys()
        machines = await self._records("machines", Machine.from_json)
        machines = [dataclasses.replace(m, cordoned=True) if m.id in cordoned else m for m in machines]
        return [_with_overlay(m, overlays[m.id]) if m.id in overlays else m for m in machines]

    # Cordons (fleetctl drain/uncordon): apart from the machine's record, like metadata edits,
    # so they outlive a fleetd restart and only the heartbeat keeps a machine alive.
    async def set_cordon(self, machine_id: str, cordoned: bool) -> None:
        if cordoned:
            await self.store.put(self.key("cordon", machine_id), "drained")
        else:
            await self.store.delete(self.key("cordon", machine_id))

    # Metadata edits (PATCH /machines): an overlay per machine, apart from the machine's record,
    # so that only the agent's heartbeat keeps a machine alive. A value of None removes the key.
    async def edit_machine_metadata(self, machine_id: str, changes: Mapping[str, str | None]) -> None:
        key = self.key("machine-metadata", machine_id)
        current = await self.store.get(key)
        overlay = {**(json.loads(current) if current else {}), **changes}
        try:
            if current is None:
                await self.store.put(key, json.dumps(overlay, sort_keys=True), create_only=True)
            else:
                await self.store.put(key, json.dumps(overlay, sort_keys=True), prev_value=current)
        except (AlreadyExists, CompareFailed):
            raise Conflict(
                f"metadata of machine {machine_id} changed while being updated; try again"
            ) from None

    # Local volumes: the first agent to make one records its machine; the engine keeps the units
    # using it there. `fleetctl volume move` changes it (see update_volume); only `fleetctl
    # volume rm` forgets it (the data stays on that disk).
    async def claim_volume(self, name: str, machine_id: str) -> str:
        """Record that volume `name` lives on `machine_id` unless it lives somewhere already;
        the machine it lives on."""
        key = self.key("volumes", name)
        try:
            await self.store.put(key, machine_id, create_only=True)
            return machine_id
        except AlreadyExists:
            owner = await self.store.get(key)
            if owner is None:
                return await self.claim_volume(name, machine_id)
            return VolumeRecord.from_text(owner).machine_id

    async def volumes(self) -> dict[str, str]:
        """Every recorded volume and the machine it lives on."""
        return {name: record.machine_id for name, record in (await self.volume_records()).items()}

    async def volume_records(self) -> dict[str, VolumeRecord]:
        """Every recorded volume with its last move; one that cannot be read goes to `unreadable`."""
        records = {}
        for name, text in sorted((await self._list("volumes")).items()):
            path = f"volumes/{name}"
            try:
                records[name] = VolumeRecord.from_text(text)
                self.unreadable.pop(path, None)
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                reason = f"its record {self.prefix}{path} cannot be read ({type(error).__name__}: {error})"
                if self.unreadable.get(path) != reason:
                    log.error("registry: skipping %s", reason)
                self.unreadable[path] = reason
        return records

    async def volume_record(self, name: str) -> VolumeRecord | None:
        text = await self.store.get(self.key("volumes", name))
        return None if text is None else VolumeRecord.from_text(text)

    async def update_volume(
        self, name: str, change: Callable[[VolumeRecord | None], VolumeRecord | None]
    ) -> VolumeRecord | None:
        """Write `change(record)` over volume `name`'s record by compare-and-swap, so that the
        several parties of a move (API, agents, engine) never undo each other's step: when another
        wrote first, `change` decides again on what it wrote. `change` returns None to leave the
        record as it is. Returns the record as it is now.

        The step rings the doorbells of the move's source and target machines with it (the same
        transaction on v3; right after it on v2, where a fleetd stopping in between leaves them
        for the engine leader to ring: see fleetpy/registry/moves.py)."""
        key = self.key("volumes", name)
        for _ in range(CAS_ATTEMPTS):
            text = await self.store.get(key)
            current = None if text is None else VolumeRecord.from_text(text)
            wanted = change(current)
            if wanted is None or wanted == current:
                return current
            written = wanted.to_text()
            bells = [Put(self._doorbell(m, name), written) for m in moves.concerned(wanted)]
            try:
                await self.store.compare_and_put(key, written, text, bells)
                return wanted
            except (AlreadyExists, CompareFailed):
                continue
            except PartlyWritten as error:
                log.warning(
                    "registry: volume %s: the step is written, its machines' doorbells not (%s); the "
                    "engine leader rings them",
                    name,
                    error,
                )
                return wanted
        raise Conflict(f"volume {name} kept changing while being updated; try again")

    # Volume doorbells: volume-moves/<machine>/<name>, so that an agent learns of the moves it
    # takes part in from its own directory alone (docs/registry.md).
    def _doorbell(self, machine_id: str, name: str) -> str:
        return self.key("volume-moves", machine_id, name)

    async def volume_doorbells(self, machine_id: str) -> dict[str, str]:
        """The doorbells of `machine_id`: each volume's record as the last step it was told of left it."""
        return await self._list("volume-moves", machine_id)

    async def all_volume_doorbells(self) -> dict[tuple[str, str], str]:
        """Every machine's doorbells, by (machine, volume)."""
        found = {}
        for path, text in (await self._list("volume-moves")).items():
            machine_id, _, name = path.partition("/")
            found[(machine_id, name)] = text
        return found

    async def volume_records_of(self, names: Iterable[str]) -> dict[str, VolumeRecord | None]:
        """The records of these volumes (None: none is recorded), in one read (one transaction
        on v3); one that cannot be read is left out, logged."""
        keys = {self.key("volumes", name): name for name in names}
        texts = await self.store.get_many(list(keys))
        found: dict[str, VolumeRecord | None] = {}
        for key, name in keys.items():
            try:
                found[name] = None if key not in texts else VolumeRecord.from_text(texts[key])
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                log.error("registry: skipping the record %s: %s: %s", key, type(error).__name__, error)
        return found

    async def ring_volume_doorbell(self, machine_id: str, name: str, text: str, seen: str | None) -> bool:
        """Tell `machine_id` of volume `name`'s record `text`, if its doorbell still holds `seen`
        (is missing, when None); whether it was rung."""
        try:
            await self.store.compare_and_put(self._doorbell(machine_id, name), text, seen)
            return True
        except (AlreadyExists, CompareFailed):
            return False

    async def answer_volume_doorbell(self, machine_id: str, name: str, seen: str) -> bool:
        """Remove `machine_id`'s doorbell of volume `name` if it still holds `seen` (a new step
        rang it meanwhile: it stays); whether it was removed."""
        try:
            return await self.store.delete(self._doorbell(machine_id, name), prev_value=seen)
        except CompareFailed:
            return False

    async def forget_volume_doorbells(self, machine_id: str) -> None:
        """Remove every doorbell of a machine gone for good."""
        await self.store.delete(self.key("volume-moves", machine_id), recursive=True)

    async def forget_volume(self, name: str) -> bool:
        """Forget where volume `name` lives; False if nothing was recorded."""
        return await self.store.delete(self.key("volumes", name))

    async def remove_machine(self, machine_id: str) -> None:
        await self.store.delete(self.key("machines", machine_id))

    # Schedule: the engine's decisions, one directory per machine so an agent watches only its own.
    async def assign(self, assignment: Assignment) -> None:
        await self.apply(self.batch().assign(assignment))

    async def unassign(self, unit: str, machine_id: str) -> None:
        await self.apply(self.batch().unassign(unit, machine_id))

    async def assignments(self, machine_id: str | None = None) -> list[Assignment]:
        directory = f"schedule/{machine_id}" if machine_id else "schedule"
        return await self._records(directory, Assignment.from_json)

    async def schedule_of(self, machine_id: str) -> tuple[list[Assignment], int]:
        """A machine's assignments, and the index they were read at: a watch from there misses
        no change since (one request, where index() and then assignments() were two)."""
        return await self._records_at(f"schedule/{machine_id}", Assignment.from_json)

    async def set_pending(self, unit: str, reason: str | None) -> None:
        await self.apply(self.batch().set_pending(unit, reason))

    async def pending(self) -> dict[str, str]:
        return await self._list("pending")

    # Machines the engine keeps units off after their health checks failed there (HealthCheckMoveAfter).
    async def avoided(self) -> list[Avoidance]:
        return await self._records("avoid", Avoidance.from_json)

    # What pending units ask of machines' facts: an agent publishes a fact change that makes one
    # of these hold, or stop holding, at once, however small the change.
    async def set_asked_facts(self, constraints: list[str]) -> None:
        await self.store.put(self.key("asked-facts"), json.dumps(constraints))

    async def asked_facts(self) -> list[str]:
        text = await self.store.get(self.key("asked-facts"))
        return json.loads(text) if text else []

    # Unit states: published by the agent running the unit.
    async def publish_state(self, state: UnitState) -> None:
        await self.apply(self.batch().publish_state(state))

    async def remove_state(self, unit: str, machine_id: str) -> None:
        await self.apply(self.batch().remove_state(unit, machine_id))

    async def states(self) -> list[UnitState]:
        return await self._records("state", UnitState.from_json)

    # Engine leadership: a TTL'd key; whoever creates it leads until it stops refreshing.
    async def acquire_leadership(self, holder: str, ttl: float) -> bool:
        """Take the leader lease if it is free, or take back `holder`'s own: one whose resign
        never reached etcd (etcd had lost its quorum, say) stays `holder`'s until it expires."""
        try:
            await self.store.put(self.key("engine", "leader"), holder, ttl=ttl, create_only=True)
            return True
        except AlreadyExists:
            return await self.renew_leadership(holder, ttl)

    async def renew_leadership(self, holder: str, ttl: float) -> bool:
        key = self.key("engine", "leader")
        if await self.store.get(key) != holder:
            return False
        return await self.store.refresh(key, ttl)

    async def leader(self) -> str | None:
        return await self.store.get(self.key("engine", "leader"))

    async def resign(self, holder: str) -> None:
        with contextlib.suppress(CompareFailed):
            await self.store.delete(self.key("engine", "leader"), prev_value=holder)

    # Events: each fleetd's own bounded history, rewritten whole (oldest trimmed) by its recorder.
    async def put_events(self, machine_id: str, events: list[Event]) -> None:
        await self.store.put(self.key("events", machine_id), json.dumps([e.to_json() for e in events]))

    async def event_reporters(self) -> list[str]:
        """Machines with an event history."""
        return sorted(await self._list("events"))

    async def delete_events(self, machine_id: str) -> None:
        await self.store.delete(self.key("events", machine_id))

    async def events(self, machine_id: str | None = None) -> list[Event]:
        """Recorded events, oldest first; only `machine_id`'s own record if given."""
        if machine_id is not None:
            text = await self.store.get(self.key("events", machine_id))
            records = [] if text is None else [text]
        else:
            records = list((await self._list("events")).values())
        found = [Event.from_json(item) for text in records for item in json.loads(text)]
        return sorted(found, key=lambda e: (e.time, e.reporter, e.seq))

    async def last_failure(self) -> float:
        """When (time.monotonic) etcd last failed a request: the end of the latest outage.

        Answered locally; async like every other registry read, so callers need not know."""
        return self.store.last_failure()

    def outage(self) -> Unavailable | None:
        """Why etcd fails now (NoQuorum when its members answer without a leader), or None."""
        return self.store.outage()

    # Watches: block until something under a directory changes after `after_index`.
    async def index(self) -> int:
        return await self.store.index(self.prefix)

    async def close(self) -> None:
        await self.store.close()

    async def wait(self, after_index: int, *parts: str, timeout: float = 30.0) -> int | None:
        return await self.store.wait(self.key(*parts), after_index, timeout)


def _with_overlay(machine: Machine, overlay: Mapping[str, str | None]) -> Machine:
    metadata = {**machine.metadata, **overlay}
    return dataclasses.replace(machine, metadata={k: v for k, v in metadata.items() if v is not None})


def memory_registry(prefix: str = DEFAULT_PREFIX, clock: Callable[[], float] = time.monotonic) -> Registry:
    """A registry over the in-memory store: the fake used by fast tests."""
    return Registry(MemoryStore(clock), prefix)
