"""The event-fed engine: the leader lists the registry once, then plans from its watch-fed copy,
only when something a plan reads changed, and its next pass sees its own writes."""

from __future__ import annotations

import asyncio

from fleetpy.engine.engine import Engine
from fleetpy.registry import Machine, Registry, memory_registry
from fleetpy.registry.models import UnitState
from tests.test_engine import _placed, _submit, _submit_unparsable, _until
from tests.test_registry_mirror import CountingStore


class CountedEngine(Engine):
    passes = 0

    async def reconcile(self, **kwargs):
        self.passes += 1
        return await super().reconcile(**kwargs)


def _counted(registry: Registry) -> tuple[Registry, CountingStore]:
    """The same registry through a store that counts the engine's calls."""
    store = CountingStore(registry.store)
    return Registry(store, registry.prefix), store


async def test_the_leader_lists_once_and_schedules_every_later_submit_from_its_watch(running):
    registry = memory_registry()
    engine_registry, store = _counted(registry)
    for i in range(3):
        await registry.register_machine(Machine(f"m{i}"), ttl=60)
    engine = CountedEngine(engine_registry, "m0", lease_ttl=5, reconcile_interval=3600)
    running(engine.run())
    await _until(lambda: _flag(engine))
    for i in range(6):
        await _submit(registry, f"u{i}.service")
    await _until(lambda: _placed(registry, {f"u{i}.service": f"m{i % 3}" for i in range(6)}))
    # One listing of the prefix when it took the lead; every pass after it read the copy.
    assert store.calls["list"] == 1, store.calls
    assert engine.passes >= 2


async def _flag(engine):
    return engine.leading.is_set()


async def test_a_state_or_event_write_starts_no_pass_and_a_machine_joining_does(running):
    registry = memory_registry()
    await registry.register_machine(Machine("m1"), ttl=60)
    engine = CountedEngine(registry, "m1", lease_ttl=5, reconcile_interval=3600)
    running(engine.run())
    await _submit(registry, "a.service")
    await _until(lambda: _placed(registry, {"a.service": "m1"}))
    await _settled(engine, registry)
    passes = engine.passes  # the pass's own echoes (schedule/, pending/) start nothing either
    for _ in range(5):
        await registry.publish_state(UnitState("a.service", "m1", "h", "loaded", "active", "running"))
        await registry.put_events("m1", [])
    await _settled(engine, registry)
    assert engine.passes == passes
    await registry.register_machine(Machine("m2"), ttl=60)
    await _submit(registry, "b.service")
    await _until(lambda: _placed(registry, {"a.service": "m1", "b.service": "m2"}))
    assert engine.passes > passes


async def _settled(engine, registry):
    """Once the leader's copy holds every write so far, and its loop had a chance to run."""
    mirror = engine._view.store.mirror
    index = await registry.index()
    await _until(lambda: _reached(mirror, index))
    for _ in range(20):
        await asyncio.sleep(0)


async def _reached(mirror, index):
    return mirror.index >= index


async def test_moves_write_each_unit_once_and_never_leave_a_unit_on_two_machines(running):
    """Each pass waits until the copy holds its own writes: a pass planning from a copy that
    lacks them would place units again."""
    registry = memory_registry()
    await registry.register_machine(Machine("m1"), ttl=60)
    engine = Engine(registry, "m1", lease_ttl=5, reconcile_interval=3600)
    running(engine.run())
    for i in range(20):
        await _submit(registry, f"u{i}.service")
    await registry.register_machine(Machine("m2"), ttl=60)
    await _until(lambda: _count(registry, 20))
    per_unit = {}
    for assignment in await registry.assignments():
        per_unit.setdefault(assignment.unit, []).append(assignment.machine_id)
    assert all(len(machines) == 1 for machines in per_unit.values()), per_unit


async def _count(registry, n):
    return len(await registry.assignments()) == n


async def test_an_unparsable_unit_submitted_while_leading_is_quarantined_and_the_rest_goes_on(running):
    registry = memory_registry()
    await registry.register_machine(Machine("m1"), ttl=60)
    engine = Engine(registry, "m1", lease_ttl=5, reconcile_interval=3600)
    running(engine.run())
    await _until(lambda: _flag(engine))
    await _submit_unparsable(registry, "bad.service")
    await registry.store.put(registry.key("job", "worse.service"), "{not json")
    await _submit(registry, "good.service")
    await _until(lambda: _placed(registry, {"good.service": "m1"}))
    await _until(lambda: _has_pending(registry, "bad.service", "worse.service"))
    pending = await registry.pending()
    assert "cannot be read" in pending["bad.service"]
    assert "job/worse.service cannot be read" in pending["worse.service"]


async def _has_pending(registry, *units):
    return set(units) <= (await registry.pending()).keys()
