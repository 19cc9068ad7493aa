"""The engine loop over the in-memory registry: leadership, watch-driven scheduling, error
boundaries and the grace machines get after a leader change. Time is a manual clock shared by
the store (TTLs) and the engine (grace), so no test waits out a TTL."""

from __future__ import annotations

import asyncio
import json
import logging

from fleetpy.engine import engine as engine_module
from fleetpy.engine import scheduler
from fleetpy.engine.engine import LEASE_MARGIN, Engine
from fleetpy.engine.explain import explain_placement
from fleetpy.registry import (
    Assignment,
    Job,
    Machine,
    ManualClock,
    MemoryStore,
    NoQuorum,
    Registry,
    memory_registry,
)
from fleetpy.unit import UnitFile

TRUE = "[Service]\nExecStart=/bin/true\n"


async def _until(predicate, timeout=3.0):
    async def check():
        while not await predicate():
            await asyncio.sleep(0.002)

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


class WithoutQuorum(MemoryStore):
    """A store whose every request fails as etcd's do once it lost its quorum, while `lost`."""

    def __init__(self, clock):
        super().__init__(clock)
        self.lost = False

    def outage(self):
        return NoQuorum("etcd has lost its quorum (test)") if self.lost else None

    def __getattribute__(self, name):
        attribute = super().__getattribute__(name)
        if name in {"put", "get", "list", "refresh", "delete", "index", "apply"}:

            async def request(*args, **kwargs):
                if self.lost:
                    raise self.outage()
                return await attribute(*args, **kwargs)

            return request
        return attribute


async def test_without_quorum_scheduling_pauses_once_with_why_and_resumes_with_its_own_lease(
    running, monkeypatch, caplog
):
    monkeypatch.setattr(engine_module, "OUTAGE_PAUSE", 0.002)
    caplog.set_level(logging.INFO, logger="fleetpy.engine.engine")
    clock = ManualClock()  # never advanced: m1's lease from before the outage never expires
    store = WithoutQuorum(clock)
    registry = Registry(store)
    await registry.register_machine(Machine("m1"), ttl=30)
    # m1 led, and its resign could not reach etcd: the lease is still its own.
    assert await registry.acquire_leadership("m1", 30)
    await _submit(registry, "a.service")
    store.lost = True
    engine = Engine(registry, "m1", lease_ttl=30, reconcile_interval=3600, clock=clock)
    running(engine.run())

    def paused():
        return [r.getMessage() for r in caplog.records if "scheduling paused" in r.getMessage()]

    await _until(lambda: _true(len([r for r in caplog.records if "engine:" in r.getMessage()]) >= 5))
    assert paused() == [
        "engine: scheduling paused: etcd has lost its quorum (test); units already running keep "
        "running, and scheduling resumes when etcd answers again"
    ]
    store.lost = False
    # m1 takes its own lease back at once, not after it expired, and schedules.
    await _until(lambda: _placed(registry, {"a.service": "m1"}))
    assert any("scheduling resumes" in r.getMessage() for r in caplog.records)
    assert len(paused()) == 1


async def _true(value):
    return value


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
    # the periodic pass (an hour away). The lease is renewed meanwhile, as the engine's own
    # renewals (on real time) would: a leader whose lease expired writes nothing.
    clock.advance(4)
    assert await registry.renew_leadership("m1", 5)
    clock.advance(2)
    await _until(lambda: _placed(registry, {"a.service": "m1", "b.service": "m1"}))


async def test_unschedulable_unit_gets_a_pending_reason():
    registry = memory_registry()
    await registry.register_machine(Machine("m1", metadata={"role": "web"}), ttl=30)
    engine = Engine(registry, "m1", lease_ttl=5)
    await _submit(registry, "db.service", TRUE + "[X-Fleet]\nMachineMetadata=role=db\n")
    await engine.reconcile()
    assert "role=db" in (await registry.pending())["db.service"]
    assert await registry.assignments() == []


async def test_units_sharing_a_file_have_it_read_and_parsed_once_with_new_ones_in_one_read(monkeypatch):
    registry = memory_registry()
    await registry.register_machine(Machine("m1"), ttl=30)
    engine = Engine(registry, "m1", lease_ttl=5)
    reads, parses = [], []
    real_read, real_parse = registry.unit_files, UnitFile.parse

    async def read(digests):
        reads.append(set(digests))
        return await real_read(digests)

    def parse(text):
        parses.append(text)
        return real_parse(text)

    monkeypatch.setattr(registry, "unit_files", read)
    template = await _submit(registry, "web@1.service")
    await _submit(registry, "web@2.service")
    other = await _submit(registry, "db.service", TRUE.replace("true", "false"))
    monkeypatch.setattr(UnitFile, "parse", parse)
    await engine.reconcile()
    assert reads == [{template, other}] and len(parses) == 2
    await registry.create_job(Job("web@3.service", template, "launched"))
    await engine.reconcile()
    assert reads == [{template, other}] and len(parses) == 2  # web@3 shares web@1's file
    assert {a.unit for a in await registry.assignments()} == {
        "web@1.service",
        "web@2.service",
        "web@3.service",
        "db.service",
    }


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

    def failing_plan(machines, jobs, current, detail=(), volumes=None, avoided=None, moving=None):
        if any(job.name == "boom.service" for job, _ in jobs):
            raise KeyError("a scheduler bug")
        return real_plan(machines, jobs, current, detail, volumes or {}, avoided or {}, moving or {})

    monkeypatch.setattr(scheduler, "plan", failing_plan)
    await Engine(registry, "m1", lease_ttl=5).reconcile()
    assignments = {a.unit: a.machine_id for a in await registry.assignments()}
    assert assignments["boom.service"] == "m2" and "fine.service" in assignments
    assert "the scheduler fails on it: KeyError" in (await registry.pending())["boom.service"]


async def test_a_leader_that_cannot_schedule_logs_why_and_gives_up_its_lease(running, monkeypatch, caplog):
    registry = memory_registry()
    await registry.register_machine(Machine("m1"), ttl=30)
    broken, healthy = Engine(registry, "m1", lease_ttl=30), Engine(registry, "m2", lease_ttl=30)

    async def crash(**_):
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
    clock.advance(9)
    assert await registry.renew_leadership("m1", 10)  # as the engine's renewals would
    clock.advance(1)
    await registry.register_machine(Machine("m3"), ttl=300)  # any event wakes the engine
    await _until(lambda: _placed(registry, {"moves.service": "m3", "new.service": "m1"}))


async def _leading_with(registry, clock, own_ttl):
    """m1 leads (lease 30 s) and runs a.service; its record lives `own_ttl`, m2's for ever."""
    await registry.register_machine(Machine("m1"), ttl=own_ttl)
    await registry.register_machine(Machine("m2"), ttl=3600)
    digest = await _submit(registry, "a.service")
    await registry.assign(Assignment("a.service", "m1", digest, "launched"))
    engine = Engine(registry, "m1", lease_ttl=30, reconcile_interval=3600, clock=clock)
    return engine


async def test_a_leader_that_stalled_past_its_lease_writes_nothing_after_it(running, caplog):
    # B7 in CI: the leader's fleetd stalled under load; its lease and its own machine record
    # lapsed together and another engine took over. On waking, the old leader scheduled on what
    # it read (its own machine gone, its grace long over) before it noticed the lost lease.
    clock = ManualClock()
    registry = _manual_registry(clock)
    engine = await _leading_with(registry, clock, own_ttl=20)
    running(engine.run())
    await _until(lambda: _flag(engine.leading))
    await _submit(registry, "first.service")
    await _until(lambda: _placed(registry, {"a.service": "m1", "first.service": "m2"}))
    clock.advance(31)  # the stall: the lease and m1's record expire in the store meanwhile
    assert await registry.acquire_leadership("m2", 30)  # another engine leads now
    await _submit(registry, "b.service")  # wakes the stale leader
    await _until(lambda: _not_leading(engine))
    # It renewed before writing, found the lease gone, and wrote nothing.
    assert await _placed(registry, {"a.service": "m1", "first.service": "m2"})
    assert any("renewing before writing" in r.getMessage() for r in caplog.records)
    # When the lease is free again it leads as a new leader: m1's agent (running) gets one TTL
    # to register again, so a.service stays.
    await registry.resign("m2")
    await _until(lambda: _placed(registry, {"a.service": "m1", "first.service": "m2", "b.service": "m2"}))


async def _not_leading(engine):
    return not engine.leading.is_set()


async def test_a_leader_keeps_its_own_units_for_one_ttl_when_its_own_record_lapsed(running):
    # The lease was renewed in time but the machine record was not (its heartbeat fell due
    # during the stall): this fleetd runs, so its agent is registering it again.
    clock = ManualClock()
    registry = _manual_registry(clock)
    engine = await _leading_with(registry, clock, own_ttl=30)
    running(engine.run())
    await _until(lambda: _flag(engine.leading))
    # Past the lease's margin the leader renews it before writing.
    clock.advance(30 * (1 - LEASE_MARGIN) + 1)
    await _submit(registry, "first.service")
    await _until(lambda: _placed(registry, {"a.service": "m1", "first.service": "m2"}))
    clock.advance(10)  # m1's record lapsed; the lease is still sure, the new-leader grace over
    await _submit(registry, "b.service")
    await _until(lambda: _has(registry, "b.service"))
    assert await _placed(registry, {"a.service": "m1", "first.service": "m2", "b.service": "m2"})
    # Its grace is one TTL: a record that never comes back lets the units move after it.
    clock.advance(10)
    await registry.renew_leadership("m1", 30)
    await _submit(registry, "c.service")
    await _until(lambda: _has(registry, "c.service"))
    assert (await _assigned(registry))["a.service"] == "m1"
    clock.advance(21)
    await registry.renew_leadership("m1", 30)
    await _submit(registry, "d.service")
    await _until(lambda: _placed_on(registry, "a.service", "m2"))


async def _assigned(registry):
    return {a.unit: a.machine_id for a in await registry.assignments()}


async def _placed_on(registry, unit, machine_id):
    return (await _assigned(registry)).get(unit) == machine_id


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
