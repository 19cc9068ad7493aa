"""The engine loop over the in-memory registry: leadership, watch-driven scheduling, error
boundaries and the grace machines get after a leader change. Time is a manual clock shared by
the store (TTLs) and the engine (grace), so no test waits out a TTL."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from fleetpy.engine import scheduler
from fleetpy.engine.engine import Engine
from fleetpy.engine.explain import explain_placement
from fleetpy.registry import Assignment, Job, Machine, ManualClock, MemoryStore, Registry, memory_registry
from fleetpy.unit import UnitFile

TRUE = "[Service]\nExecStart=/bin/true\n"


async def _until(predicate, timeout=3.0):
    async def check():
        while not await predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(check(), timeout)


async def _submit(registry, name, text=TRUE, state="launched"):
    digest = await registry.put_unit_file(UnitFile.parse(text))
    await registry.create_job(Job(name, digest, state))
    return digest


async def _submit_unparsable(registry, name):
    """A stored unit text that no longer parses, as an older fleetd or a hand edit could leave."""
    digest = "f" * 40
    await registry.store.put(registry.key("unit", digest), "[Service]\nExecStart=/bin/true\r[oops\n")
    await registry.create_job(Job(name, digest, "launched"))


def _manual_registry(clock: ManualClock) -> Registry:
    return Registry(MemoryStore(clock))


async def _placed(registry, expected):
    return {a.unit: a.machine_id for a in await registry.assignments()} == expected


async def _leader_is(registry, *ids):
    return await registry.leader() in ids


async def _flag(event):
    return event.is_set()


@pytest.fixture
def running():
    tasks = []
    yield lambda coro: tasks.append(asyncio.create_task(coro)) or tasks[-1]
    for task in tasks:
        task.cancel()


async def test_only_one_engine_leads_and_another_takes_over(running):
    registry = memory_registry()
    first, second = Engine(registry, "m1", lease_ttl=1), Engine(registry, "m2", lease_ttl=1)
    tasks = [running(first.run()), running(second.run())]
    await _until(lambda: _leader_is(registry, "m1", "m2"))
    leader, follower = (first, second) if first.leading.is_set() else (second, first)
    assert not follower.leading.is_set()
    tasks[[first, second].index(leader)].cancel()
    await _until(lambda: _flag(follower.leading))


async def test_a_stopped_leader_resigns_at_once(running):
    # B10: the lease is 30 s; a leader that did not resign would hold it that long.
    registry = memory_registry()
    engine = Engine(registry, "m1", lease_ttl=30)
    task = running(engine.run())
    await _until(lambda: _leader_is(registry, "m1"))
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert await registry.leader() is None


async def test_engine_schedules_on_submit_and_reschedules_when_a_machine_expires(running):
    clock = ManualClock()
    registry = _manual_registry(clock)
    await registry.register_machine(Machine("m1"), ttl=30)
    await registry.register_machine(Machine("m2"), ttl=5)
    engine = Engine(registry, "m1", lease_ttl=5, reconcile_interval=60, clock=clock)
    running(engine.run())
    await _submit(registry, "a.service")
    await _submit(registry, "b.service")
    await _until(lambda: _placed(registry, {"a.service": "m1", "b.service": "m2"}))
    # m2 stops heartbeating: once its record expires its unit moves to m1, without waiting for
    # the periodic pass (an hour away).
    clock.advance(6)
    await _until(lambda: _placed(registry, {"a.service": "m1", "b.service": "m1"}))


async def test_unschedulable_unit_gets_a_pending_reason():
    registry = memory_registry()
    await registry.register_machine(Machine("m1", metadata={"role": "web"}), ttl=30)
    engine = Engine(registry, "m1", lease_ttl=5)
    await _submit(registry, "db.service", TRUE + "[X-Fleet]\nMachineMetadata=role=db\n")
    await engine.reconcile()
    assert "role=db" in (await registry.pending())["db.service"]
    assert await registry.assignments() == []


async def test_a_unit_that_no_longer_parses_is_pending_with_a_reason_and_the_rest_is_scheduled(
    running, caplog
):
    # B2: this used to kill the leader's scheduling task, silently, while it kept the lease.
    registry = memory_registry()
    await registry.register_machine(Machine("m1"), ttl=30)
    engine = Engine(registry, "m1", lease_ttl=5, reconcile_interval=60)
    await _submit_unparsable(registry, "bad.service")
    running(engine.run())
    await _until(lambda: _leader_is(registry, "m1"))
    await _submit(registry, "good.service")
    await _until(lambda: _placed(registry, {"good.service": "m1"}))
    reason = (await registry.pending())["bad.service"]
    assert "cannot be read" in reason and "line 2" in reason, reason
    machines, current = await registry.machines(), await registry.assignments()
    explained = explain_placement("bad.service", machines, [], current, await registry.pending())
    assert explained == [f"bad.service pending: {reason}", "  now on no machine"]
    await _submit(registry, "later.service")
    await _until(lambda: _placed(registry, {"good.service": "m1", "later.service": "m1"}))
    assert sum("quarantined bad.service" in r.getMessage() for r in caplog.records) == 1


async def test_a_unit_the_scheduler_fails_on_is_quarantined_and_keeps_its_machine(monkeypatch):
    registry = memory_registry()
    await registry.register_machine(Machine("m1"), ttl=30)
    await registry.register_machine(Machine("m2"), ttl=30)
    digest = await _submit(registry, "boom.service")
    await _submit(registry, "fine.service")
    await registry.assign(Assignment("boom.service", "m2", digest, "launched"))
    real_plan = scheduler.plan

    def failing_plan(machines, jobs, current, detail=()):
        if any(job.name == "boom.service" for job, _ in jobs):
            raise KeyError("a scheduler bug")
        return real_plan(machines, jobs, current, detail)

    monkeypatch.setattr(scheduler, "plan", failing_plan)
    await Engine(registry, "m1", lease_ttl=5).reconcile()
    assignments = {a.unit: a.machine_id for a in await registry.assignments()}
    assert assignments["boom.service"] == "m2" and "fine.service" in assignments
    assert "the scheduler fails on it: KeyError" in (await registry.pending())["boom.service"]


async def test_a_leader_that_cannot_schedule_logs_why_and_gives_up_its_lease(running, monkeypatch, caplog):
    registry = memory_registry()
    await registry.register_machine(Machine("m1"), ttl=30)
    broken, healthy = Engine(registry, "m1", lease_ttl=30), Engine(registry, "m2", lease_ttl=30)

    async def crash():
        raise RuntimeError("engine bug")

    monkeypatch.setattr(broken, "reconcile", crash)
    running(broken.run())
    await _until(lambda: _leader_is(registry, "m1"))
    running(healthy.run())
    await _until(lambda: _flag(healthy.leading))
    await _submit(registry, "a.service")
    await _until(lambda: _placed(registry, {"a.service": "m1"}))
    failure = next(r for r in caplog.records if "giving up the leader lease" in r.getMessage())
    assert failure.levelno == logging.ERROR and "engine bug" in str(failure.exc_info[1])


async def test_a_new_leader_gives_missing_machines_one_ttl_before_moving_their_units(running):
    # B8: every fleetd restarted; m1 is back first, m2's record has expired but m2 is coming.
    clock = ManualClock()
    registry = _manual_registry(clock)
    await registry.register_machine(Machine("m1"), ttl=30)
    on_m2 = await _submit(registry, "stays.service")
    await registry.assign(Assignment("stays.service", "m2", on_m2, "launched"))
    engine = Engine(registry, "m1", lease_ttl=10, reconcile_interval=3600, clock=clock)
    running(engine.run())
    await _until(lambda: _flag(engine.leading))
    await _submit(registry, "new.service")
    await _until(lambda: _placed(registry, {"stays.service": "m2", "new.service": "m1"}))
    clock.advance(5)
    await registry.register_machine(Machine("m2"), ttl=30)  # back within the TTL: nothing moves
    await _submit(registry, "newer.service")
    await _until(lambda: _has(registry, "newer.service"))
    assert {a.unit: a.machine_id for a in await registry.assignments()}["stays.service"] == "m2"


async def _has(registry, unit):
    return unit in {a.unit for a in await registry.assignments()}


async def test_units_of_a_machine_that_does_not_come_back_move_after_the_grace(running):
    clock = ManualClock()
    registry = _manual_registry(clock)
    await registry.register_machine(Machine("m1"), ttl=300)
    on_m2 = await _submit(registry, "moves.service")
    await registry.assign(Assignment("moves.service", "m2", on_m2, "launched"))
    engine = Engine(registry, "m1", lease_ttl=10, reconcile_interval=3600, clock=clock)
    running(engine.run())
    await _until(lambda: _flag(engine.leading))
    await _submit(registry, "new.service")
    await _until(lambda: _placed(registry, {"moves.service": "m2", "new.service": "m1"}))
    clock.advance(10)
    await registry.register_machine(Machine("m3"), ttl=300)  # any event wakes the engine
    await _until(lambda: _placed(registry, {"moves.service": "m3", "new.service": "m1"}))


async def test_a_metadata_edit_wakes_the_engine(running):
    registry = memory_registry()
    await registry.register_machine(Machine("m1", metadata={"role": "web"}), ttl=30)
    engine = Engine(registry, "m1", lease_ttl=5, reconcile_interval=3600)
    running(engine.run())
    await _submit(registry, "db.service", TRUE + "[X-Fleet]\nMachineMetadata=role=db\n")
    await _until(lambda: _is_pending(registry, "db.service"))
    await registry.edit_machine_metadata("m1", {"role": "db"})
    await _until(lambda: _placed(registry, {"db.service": "m1"}))


async def _is_pending(registry, unit):
    return unit in await registry.pending()


async def test_unreadable_job_and_machine_records_are_quarantined_and_the_rest_goes_on(caplog):
    # A job or machine record that is not valid JSON (an older fleetd, a hand edit) made every
    # engine give up its lease in turn; now it is skipped with a reason and its unit stays put.
    registry = memory_registry()
    await registry.register_machine(Machine("m1"), ttl=30)
    await registry.store.put(registry.key("machines", "m2"), "{not json")
    digest = await _submit(registry, "kept.service")
    await registry.assign(Assignment("kept.service", "m1", digest, "launched"))
    await registry.store.put(registry.key("job", "kept.service"), '{"name": "kept.service"}')
    engine = Engine(registry, "m1", lease_ttl=5)
    await _submit(registry, "good.service")
    await engine.reconcile()
    assert [m.id for m in await registry.machines()] == ["m1"]
    assert await _placed(registry, {"kept.service": "m1", "good.service": "m1"})
    reason = (await registry.pending())["kept.service"]
    assert "job/kept.service cannot be read" in reason and "KeyError" in reason, reason
    await engine.reconcile()
    assert (
        sum("skipping" in r.getMessage() and "job/kept.service" in r.getMessage() for r in caplog.records)
        == 1
    )
    await registry.store.put(
        registry.key("job", "kept.service"), json.dumps(Job("kept.service", digest).to_json())
    )
    await engine.reconcile()
    assert "kept.service" not in await registry.pending()
