"""The registry behaves the same over real etcd and over the in-memory store."""

from __future__ import annotations

import asyncio
import time

import pytest
from aetcd import rpc

from fleetpy.registry import (
    Assignment,
    Conflict,
    HistoryLost,
    Job,
    Machine,
    ManualClock,
    NotFound,
    Registry,
    Unavailable,
    UnitState,
    memory_registry,
)
from fleetpy.registry.etcd2 import EtcdV2Store
from fleetpy.registry.etcd3 import EtcdV3Store
from fleetpy.registry.memory import MemoryStore
from fleetpy.registry.store import AlreadyExists, CompareFailed, Put
from fleetpy.unit import UnitFile


@pytest.fixture
def registry(any_registry):
    return any_registry


HELLO = UnitFile.parse("[Service]\nExecStart=/bin/sleep 1000\n")


async def test_unit_files_are_stored_by_content_hash(registry):
    digest = await registry.put_unit_file(HELLO)
    assert digest == HELLO.hash
    assert await registry.put_unit_file(HELLO) == digest
    assert await registry.unit_file(digest) == HELLO
    assert await registry.unit_file("0" * 40) is None


async def test_several_unit_files_are_read_at_once_with_why_each_missing_one_is(registry):
    other = UnitFile.parse("[Service]\nExecStart=/bin/true\n")
    await registry.put_unit_file(HELLO)
    await registry.put_unit_file(other)
    await registry.store.put(registry.key("unit", "b" * 40), "[Service\nbroken")
    found = await registry.unit_files([HELLO.hash, other.hash, "0" * 40, "b" * 40, HELLO.hash])
    assert found[HELLO.hash] == HELLO and found[other.hash] == other
    assert "missing from the registry" in found["0" * 40]
    assert "cannot be read" in found["b" * 40]
    assert len(found) == 4


async def test_a_v3_multi_key_read_is_one_transaction_per_128_keys(v3_registry):
    keys = [v3_registry.key("many", str(i)) for i in range(300)]
    await v3_registry.store.apply([Put(key, key[-3:]) for key in keys[::2]])
    calls = 0
    real = v3_registry.store._call

    async def counted(operation):
        nonlocal calls
        calls += 1
        return await real(operation)

    v3_registry.store._call = counted
    found = await v3_registry.store.get_many(keys)
    assert found == {key: key[-3:] for key in keys[::2]}
    assert calls == 3


async def test_job_lifecycle(registry):
    await registry.create_job(Job("hello.service", HELLO.hash, "inactive"))
    with pytest.raises(Conflict):
        await registry.create_job(Job("hello.service", HELLO.hash, "inactive"))
    await registry.set_desired_state("hello.service", "launched")
    assert await registry.job("hello.service") == Job("hello.service", HELLO.hash, "launched")
    assert [j.name for j in await registry.jobs()] == ["hello.service"]
    await registry.delete_job("hello.service")
    assert await registry.job("hello.service") is None
    with pytest.raises(NotFound):
        await registry.delete_job("hello.service")
    with pytest.raises(NotFound):
        await registry.set_desired_state("hello.service", "loaded")


async def test_machines_expire_without_heartbeat(registry, elapse):
    await registry.register_machine(Machine("m1", "10.0.0.1", {"role": "web"}), ttl=1)
    assert await registry.machines() == [Machine("m1", "10.0.0.1", {"role": "web"})]
    assert await registry.refresh_machine("m1", ttl=1)
    deadline = time.monotonic() + 5
    while await registry.machines() and time.monotonic() < deadline:
        await elapse(0.25)
    assert await registry.machines() == []
    assert not await registry.refresh_machine("m1", ttl=1)


async def test_metadata_edits_lie_over_the_agents_record_and_survive_its_re_registering(registry):
    await registry.register_machine(Machine("m1", "10.0.0.1", {"role": "web", "zone": "a"}), ttl=30)
    await registry.edit_machine_metadata("m1", {"role": "db", "disk": "ssd"})
    await registry.edit_machine_metadata("m1", {"zone": None})
    assert await registry.machines() == [Machine("m1", "10.0.0.1", {"role": "db", "disk": "ssd"})]
    await registry.register_machine(Machine("m1", "10.0.0.1", {"role": "web", "zone": "a"}), ttl=30)
    assert (await registry.machines())[0].metadata == {"role": "db", "disk": "ssd"}


async def test_editing_a_dead_machines_metadata_does_not_keep_it_alive(registry, elapse):
    # B7: an edit rewrote machines/<id> with a fresh TTL, so a dead machine stayed "alive".
    await registry.register_machine(Machine("m1", "10.0.0.1", {"role": "web"}), ttl=1)
    await registry.edit_machine_metadata("m1", {"role": "db"})
    deadline = time.monotonic() + 5
    while await registry.machines() and time.monotonic() < deadline:
        await elapse(0.25)
    assert await registry.machines() == []


async def test_schedule_is_kept_per_machine(registry):
    await registry.assign(Assignment("a.service", "m1", "h", "launched"))
    await registry.assign(Assignment("b.service", "m2", "h", "loaded"))
    assert [a.unit for a in await registry.assignments("m1")] == ["a.service"]
    assert {a.unit for a in await registry.assignments()} == {"a.service", "b.service"}
    await registry.unassign("a.service", "m1")
    assert await registry.assignments("m1") == []


async def test_pending_reasons_and_states(registry):
    await registry.set_pending("web@4.service", "conflicts with web@1.service on all 3 machines")
    assert await registry.pending() == {"web@4.service": "conflicts with web@1.service on all 3 machines"}
    await registry.set_pending("web@4.service", None)
    assert await registry.pending() == {}
    state = UnitState("a.service", "m1", "h", "loaded", "active", "running")
    await registry.publish_state(state)
    assert await registry.states() == [state]
    await registry.remove_state("a.service", "m1")
    assert await registry.states() == []


async def test_only_one_leader_until_it_stops_renewing(registry):
    assert await registry.acquire_leadership("m1", ttl=1)
    assert not await registry.acquire_leadership("m2", ttl=1)
    # Its own lease, which a resign could not remove (etcd without quorum): taken back at once.
    assert await registry.acquire_leadership("m1", ttl=1)
    assert await registry.renew_leadership("m1", ttl=1)
    assert not await registry.renew_leadership("m2", ttl=1)
    assert await registry.leader() == "m1"
    await registry.resign("m2")
    assert await registry.leader() == "m1"
    await registry.resign("m1")
    assert await registry.acquire_leadership("m2", ttl=1)


async def test_wait_wakes_on_change_under_directory_only(registry, elapse):
    start = await registry.index()
    watcher = asyncio.create_task(registry.wait(start, "schedule", "m1", timeout=5))
    await elapse(0.2)
    await registry.assign(Assignment("x.service", "m2", "h", "launched"))  # another machine: no wake
    await elapse(0.2)
    assert not watcher.done()
    await registry.assign(Assignment("x.service", "m1", "h", "launched"))
    assert await asyncio.wait_for(watcher, 5) > start


async def test_wait_times_out_quietly(registry, elapse):
    watch = asyncio.create_task(registry.wait(await registry.index(), "job", timeout=0.3))
    await elapse(0.3)
    assert await asyncio.wait_for(watch, 5) is None


async def test_heartbeat_refresh_does_not_wake_watchers(etcd_registry):
    await etcd_registry.register_machine(Machine("m1"), ttl=10)
    start = await etcd_registry.index()
    await etcd_registry.refresh_machine("m1", ttl=10)
    assert await etcd_registry.wait(start, "machines", timeout=0.5) is None


async def test_a_batch_applies_schedule_pending_and_state_writes(registry):
    await registry.assign(Assignment("old.service", "m1", "h", "launched"))
    await registry.publish_state(UnitState("old.service", "m1", "h", "loaded", "active", "running"))
    batch = registry.batch()
    batch.unassign("old.service", "m1").remove_state("old.service", "m1")
    batch.assign(Assignment("a.service", "m2", "h", "launched")).set_pending("b.service", "no machine fits")
    batch.publish_state(UnitState("a.service", "m2", "h", "loaded", "active", "running"))
    batch.set_pending("c.service", "first").set_pending("c.service", "second")  # the last one wins
    assert len(batch) == 6
    await registry.apply(batch)
    assert [(a.unit, a.machine_id) for a in await registry.assignments()] == [("a.service", "m2")]
    assert await registry.pending() == {"b.service": "no machine fits", "c.service": "second"}
    assert [(s.unit, s.machine_id) for s in await registry.states()] == [("a.service", "m2")]


async def test_a_batch_larger_than_a_transaction_is_applied_whole(registry):
    batch = registry.batch()
    for i in range(300):
        batch.assign(Assignment(f"u{i}.service", "m1", "h", "launched"))
    await registry.apply(batch)
    assert len(await registry.assignments("m1")) == 300


async def test_a_v3_batch_is_one_transaction(v3_registry):
    """Every write of a batch (up to 128) lands in one revision: one round trip, atomically."""
    start = await v3_registry.index()
    batch = v3_registry.batch()
    for i in range(100):
        batch.assign(Assignment(f"u{i}.service", "m1", "h", "launched"))
    await v3_registry.apply(batch)
    assert await v3_registry.index() == start + 1


async def test_a_guarded_write_takes_its_companions_along_or_nothing(registry):
    store, key = registry.store, registry.key
    bell = [Put(key("bells", "m", "x"), "rung")]
    await store.compare_and_put(key("rec", "x"), "1", None, bell)
    assert await store.get(key("rec", "x")) == "1" and await store.get(key("bells", "m", "x")) == "rung"
    await store.delete(key("bells", "m", "x"))
    with pytest.raises(AlreadyExists):
        await store.compare_and_put(key("rec", "x"), "2", None, bell)
    with pytest.raises(CompareFailed):
        await store.compare_and_put(key("rec", "x"), "2", "0", bell)
    assert await store.get(key("rec", "x")) == "1" and await store.get(key("bells", "m", "x")) is None
    await store.compare_and_put(key("rec", "x"), "2", "1", bell)
    assert await store.get(key("rec", "x")) == "2" and await store.get(key("bells", "m", "x")) == "rung"


async def test_a_v3_guarded_write_and_its_companions_are_one_revision(v3_registry):
    store, key = v3_registry.store, v3_registry.key
    before = await v3_registry.index()
    await store.compare_and_put(key("rec", "x"), "1", None, [Put(key("bells", "m", "x"), "rung")])
    assert await v3_registry.index() == before + 1


async def test_submit_writes_the_file_and_the_job_together(registry):
    await registry.submit(HELLO, Job("hello.service", HELLO.hash, "launched"))
    assert await registry.job("hello.service") == Job("hello.service", HELLO.hash, "launched")
    assert await registry.unit_file(HELLO.hash) == HELLO
    other = UnitFile.parse("[Service]\nExecStart=/bin/true\n")
    with pytest.raises(Conflict):
        await registry.submit(other, Job("hello.service", other.hash, "launched"))
    assert (await registry.job("hello.service")).hash == HELLO.hash
    await registry.submit(other, Job("hello.service", other.hash, "inactive"), replace=True)
    assert await registry.job("hello.service") == Job("hello.service", other.hash, "inactive")


def _unit(n: int) -> UnitFile:
    return UnitFile.parse(f"[Service]\nExecStart=/bin/sleep {n}\n")


async def test_submits_made_together_all_land_and_a_conflict_answers_only_its_own(registry):
    await registry.submit(_unit(0), Job("taken.service", _unit(0).hash, "launched"))
    names = [f"u{i}.service" for i in range(30)]
    jobs = [Job(n, _unit(i).hash, "launched") for i, n in enumerate(names)]
    taken = Job("taken.service", _unit(99).hash, "launched")
    answers = await asyncio.gather(
        *(registry.submit(_unit(i), job) for i, job in enumerate(jobs)),
        registry.submit(_unit(99), taken),
        registry.submit(_unit(0), Job("twice.service", _unit(0).hash, "inactive")),
        registry.submit(_unit(1), Job("twice.service", _unit(1).hash, "launched")),
        return_exceptions=True,
    )
    assert answers[:30] == [None] * 30
    assert isinstance(answers[30], Conflict)
    # The same unit twice at once: one is created, the other finds it there.
    assert sorted(type(a).__name__ for a in answers[31:]) == ["Conflict", "NoneType"]
    won = Job("twice.service", _unit(0).hash, "inactive") if answers[31] is None else None
    found = {j.name: j for j in await registry.jobs()}
    assert found == {
        **{j.name: j for j in jobs},
        "taken.service": Job("taken.service", _unit(0).hash, "launched"),
        "twice.service": won or Job("twice.service", _unit(1).hash, "launched"),
    }
    assert await registry.unit_file(_unit(29).hash) == _unit(29)


async def test_submits_made_together_share_transactions_on_v3(v3_registry):
    """A burst of submits (fleetctl's PUTs on several connections) is a few etcd
    transactions, not one each: the jobs carry few distinct revisions."""
    start = await v3_registry.index()
    await asyncio.gather(
        *(v3_registry.submit(_unit(i), Job(f"u{i}.service", _unit(i).hash, "launched")) for i in range(40))
    )
    changes = await v3_registry.store.changes(v3_registry.key("job"), start, timeout=5)
    assert len(changes) == 40
    assert len({c.index for c in changes}) <= 3  # the first alone, the rest together


async def test_a_machines_schedule_comes_with_the_index_a_watch_goes_on_from(registry):
    await registry.assign(Assignment("a.service", "m1", HELLO.hash, "launched"))
    await registry.assign(Assignment("other.service", "m2", HELLO.hash, "launched"))
    assignments, index = await registry.schedule_of("m1")
    assert [a.unit for a in assignments] == ["a.service"]
    assert await registry.wait(index, "schedule", "m1", timeout=0.2) is None  # nothing missed or replayed
    await registry.assign(Assignment("b.service", "m1", HELLO.hash, "launched"))
    assert await registry.wait(index, "schedule", "m1", timeout=5) is not None
    assert (await registry.schedule_of("m1"))[1] > index


async def forget_history(registry: Registry) -> None:
    """Make the store drop the events written so far: v2 and memory keep the last 1000, v3
    keeps all until compacted."""
    for i in range(1010):
        await registry.store.put(registry.key("noise"), str(i))
    if isinstance(registry.store, EtcdV3Store):
        revision = await registry.index()
        await registry.store._call(lambda c: c.kv.Compact(rpc.CompactionRequest(revision=revision)))


async def test_old_watch_index_reports_history_lost(registry):
    start = await registry.index()
    await forget_history(registry)
    with pytest.raises(HistoryLost):
        await registry.wait(start, "job", timeout=1)


async def test_a_watch_resumes_from_its_revision(registry, elapse):
    """Writes made between reading the index and watching are seen, not missed."""
    start = await registry.index()
    await registry.assign(Assignment("x.service", "m1", "h", "launched"))
    first = await registry.wait(start, "schedule", "m1", timeout=5)
    assert first is not None and first > start
    # Resuming from the revision it returned sees nothing new: no event is replayed.
    resumed = asyncio.create_task(registry.wait(first, "schedule", "m1", timeout=0.3))
    await elapse(0.3)
    assert await asyncio.wait_for(resumed, 5) is None


async def test_after_history_is_lost_a_relist_and_rewatch_misses_nothing(registry):
    """What the engine and agent do on HistoryLost: read the index, re-list, watch from there."""
    start = await registry.index()
    await registry.assign(Assignment("a.service", "m1", "h", "launched"))
    await forget_history(registry)
    with pytest.raises(HistoryLost):
        await registry.wait(start, "schedule", timeout=1)
    index = await registry.index()
    assert [a.unit for a in await registry.assignments()] == ["a.service"]
    watcher = asyncio.create_task(registry.wait(index, "schedule", timeout=5))
    await registry.assign(Assignment("b.service", "m1", "h", "launched"))
    assert await watcher > index


@pytest.mark.parametrize("store", [EtcdV2Store, EtcdV3Store])
async def test_unreachable_etcd_is_a_clear_error(store):
    registry = Registry(store(["http://127.0.0.1:9"], retry_for=0.01, request_timeout=0.2))
    with pytest.raises(Unavailable, match="etcd is unreachable at http://127.0.0.1:9"):
        await registry.jobs()
    await registry.close()


async def test_the_memory_store_runs_ttls_and_watch_timeouts_on_its_clock():
    """Fast tests turn the clock by hand: a 30 s TTL and a 60 s watch end without waiting."""
    clock = ManualClock()
    registry = memory_registry(clock=clock)
    await registry.register_machine(Machine("m1"), ttl=30)
    watch = asyncio.create_task(registry.wait(await registry.index(), "job", timeout=60))
    await asyncio.sleep(2 * MemoryStore.POLL)  # it has looked at the clock again since
    assert not watch.done() and await registry.machines() == [Machine("m1")]
    clock.advance(31)
    assert await registry.machines() == []
    clock.advance(30)
    assert await asyncio.wait_for(watch, 1) is None
