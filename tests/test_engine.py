"""The engine loop over the in-memory registry: leadership, watch-driven scheduling."""

from __future__ import annotations

import asyncio

from fleetpy.engine.engine import Engine
from fleetpy.registry import Job, Machine, memory_registry
from fleetpy.registry.aio import AsyncRegistry
from fleetpy.unit import UnitFile


async def _until(predicate, timeout=3.0):
    async def check():
        while not await predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(check(), timeout)


async def _submit(registry, name, text, state="launched"):
    digest = await registry.put_unit_file(UnitFile.parse(text))
    await registry.create_job(Job(name, digest, state))


async def test_only_one_engine_leads_and_another_takes_over():
    registry = AsyncRegistry(memory_registry())
    first, second = Engine(registry, "m1", lease_ttl=1), Engine(registry, "m2", lease_ttl=1)
    tasks = [asyncio.create_task(first.run()), asyncio.create_task(second.run())]
    try:
        await _until(lambda: _leader_is(registry, "m1", "m2"))
        leader, follower = (first, second) if first.leading.is_set() else (second, first)
        assert not follower.leading.is_set()
        tasks[[first, second].index(leader)].cancel()
        await _until(lambda: _flag(follower.leading))
    finally:
        for task in tasks:
            task.cancel()


async def _leader_is(registry, *ids):
    return await registry.leader() in ids


async def _flag(event):
    return event.is_set()


async def test_engine_schedules_on_submit_and_reschedules_when_a_machine_expires():
    registry = AsyncRegistry(memory_registry())
    await registry.register_machine(Machine("m1"), ttl=30)
    await registry.register_machine(Machine("m2"), ttl=1)
    engine = Engine(registry, "m1", lease_ttl=5, reconcile_interval=60)
    task = asyncio.create_task(engine.run())
    try:
        await _submit(registry, "a.service", "[Service]\nExecStart=/bin/true\n")
        await _submit(registry, "b.service", "[Service]\nExecStart=/bin/true\n")
        await _until(lambda: _placed(registry, {"a.service": "m1", "b.service": "m2"}))
        # m2 stops heartbeating: its unit moves to m1 without any periodic pass.
        await _until(lambda: _placed(registry, {"a.service": "m1", "b.service": "m1"}))
    finally:
        task.cancel()


async def _placed(registry, expected):
    return {a.unit: a.machine_id for a in await registry.assignments()} == expected


async def test_unschedulable_unit_gets_a_pending_reason():
    registry = AsyncRegistry(memory_registry())
    await registry.register_machine(Machine("m1", metadata={"role": "web"}), ttl=30)
    engine = Engine(registry, "m1", lease_ttl=5)
    await _submit(
        registry, "db.service", "[Service]\nExecStart=/bin/true\n[X-Fleet]\nMachineMetadata=role=db\n"
    )
    await engine.reconcile()
    assert "role=db" in (await registry.pending())["db.service"]
    assert await registry.assignments() == []
