"""Events: the recorder (bounded, batched, never blocking its caller), what the engine and the
agent record, and the history in a real etcd."""

from __future__ import annotations

import asyncio

import pytest

from fleetpy.agent.agent import Agent
from fleetpy.engine.engine import Engine
from fleetpy.engine.scheduler import Decision
from fleetpy.events import AgentEvents, EngineEvents, Recorder, kinds
from fleetpy.events.engine import expired_histories, schedule_changes
from fleetpy.registry import (
    Assignment,
    Job,
    Machine,
    ManualClock,
    MemoryStore,
    Registry,
    StoreError,
    Unavailable,
    memory_registry,
)
from fleetpy.systemd.fake import FakeSystemd
from fleetpy.unit import UnitFile

SLEEP = "[Service]\nExecStart=/bin/sleep 1000\n"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


class Outage:
    """A registry whose writes fail until `up` is set: etcd away."""

    def __init__(self, registry):
        self.registry = registry
        self.up = False
        self.refused = 0

    async def events(self, machine_id=None):
        return await self.registry.events(machine_id)

    async def put_events(self, machine_id, events):
        if not self.up:
            self.refused += 1
            raise Unavailable("etcd is unreachable (test)")
        await self.registry.put_events(machine_id, events)


async def test_recorder_writes_batches_and_keeps_only_the_newest():
    registry = memory_registry()
    recorder = Recorder(registry, "m1", history=5, clock=Clock())
    for i in range(8):
        recorder.emit(kinds.UNIT_STARTED, f"u{i}.service started", unit=f"u{i}.service")
    await recorder.flush()
    stored = await registry.events()
    assert [e.message for e in stored] == [f"u{i}.service started" for i in range(3, 8)]
    assert [e.seq for e in stored] == [4, 5, 6, 7, 8]
    assert {e.reporter for e in stored} == {"m1"}
    assert stored[0].type == "Normal" and stored[0].machine_id == "m1"
    assert not recorder.queued


async def test_emit_never_blocks_and_drops_the_oldest_when_etcd_stays_away():
    store = Outage(memory_registry())
    recorder = Recorder(store, "m1", queue=3, clock=Clock())
    for i in range(5):
        recorder.emit(kinds.UNIT_FAILED, f"event {i}")
    assert [e.message for e in recorder.queued] == ["event 2", "event 3", "event 4"]
    assert recorder.dropped == 2
    with pytest.raises(StoreError):
        await recorder.flush()
    assert len(recorder.queued) == 3  # kept for later
    store.up = True
    await recorder.flush()
    assert [e.message for e in await store.events()] == ["event 2", "event 3", "event 4"]


async def test_emit_survives_a_bad_argument():
    recorder = Recorder(memory_registry(), "m1")
    recorder.emit(kinds.UNIT_STARTED, object())  # not a string: logged, still queued or not, never raised
    recorder.emit(kinds.UNIT_STARTED, "fine")
    assert recorder.queued[-1].message == "fine"


async def test_run_writes_in_the_background_after_an_outage():
    # That it gathers, retries and writes is tested, not how long it waits between.
    store = Outage(memory_registry())
    recorder = Recorder(store, "m1", clock=Clock(), batch_delay=0.002, retry_pause=0.002)
    task = asyncio.create_task(recorder.run())
    try:
        recorder.emit(kinds.ETCD_UNREACHABLE, "etcd unreachable")
        for _ in range(1000):
            if store.refused >= 2:
                break
            await asyncio.sleep(0.005)
        assert store.refused >= 2 and await store.events() == []
        store.up = True
        for _ in range(1000):
            if await store.events():
                break
            await asyncio.sleep(0.005)
        assert [e.kind for e in await store.events()] == [kinds.ETCD_UNREACHABLE]
    finally:
        task.cancel()


async def test_a_restarted_recorder_numbers_on_and_keeps_the_history():
    registry, clock = memory_registry(), Clock()
    first = Recorder(registry, "m1", clock=clock)
    first.emit(kinds.MACHINE_JOINED, "joined")
    first.emit(kinds.MACHINE_LEFT, "left")
    await first.flush()
    second = Recorder(registry, "m1", clock=clock)
    second.emit(kinds.MACHINE_JOINED, "joined again")
    await second.flush()
    assert [(e.seq, e.message) for e in await registry.events()] == [
        (1, "joined"),
        (2, "left"),
        (3, "joined again"),
    ]


def test_schedule_changes_say_scheduled_moved_and_pending_with_reasons():
    before = [
        Assignment("a.service", "m1aaaaaaaa", "h", "launched"),
        Assignment("b.service", "m2bbbbbbbb", "h", "launched"),
    ]
    after = [
        Assignment("a.service", "m3cccccccc", "h", "launched"),
        Assignment("c.service", "m2bbbbbbbb", "h", "launched"),
    ]
    decisions = {
        "a.service": Decision("a.service", "m3cccccccc", reason="least loaded (0 units)"),
        "c.service": Decision("c.service", "m2bbbbbbbb", reason="only machine that fits"),
    }
    changes = schedule_changes(
        before,
        after,
        decisions,
        alive={"m2bbbbbbbb", "m3cccccccc"},
        reasons={"d.service": "no machine fits: conflicts with c.service", "e.service": "same"},
        stored_reasons={"e.service": "same"},
    )
    assert [(c.kind, c.unit, c.message) for c in changes] == [
        (
            kinds.UNIT_MOVED,
            "a.service",
            "a.service moved from m1aaaaaa (machine gone) to m3cccccc: least loaded (0 units)",
        ),
        (kinds.UNIT_SCHEDULED, "c.service", "c.service scheduled to m2bbbbbb: only machine that fits"),
        (kinds.UNIT_PENDING, "d.service", "d.service pending: no machine fits: conflicts with c.service"),
    ]


async def _submit(registry, name, text=SLEEP, state="launched"):
    digest = await registry.put_unit_file(UnitFile.parse(text))
    await registry.create_job(Job(name, digest, state))


async def test_engine_records_leadership_scheduling_and_a_lost_machine():
    registry = memory_registry()
    recorder = Recorder(registry, "m1", clock=Clock())
    engine = Engine(registry, "m1", lease_ttl=5, events=EngineEvents(recorder, ttl=5))
    for mid in ("m1", "m2"):
        await registry.register_machine(Machine(mid), 60)
    await _submit(registry, "web.service", "[Service]\nExecStart=/bin/true\n[X-Fleet]\nMachineID=m2\n")
    engine.events.leading("m1")
    await engine.reconcile()
    await registry.remove_machine("m2")
    await engine.reconcile()
    await recorder.flush()
    got = [(e.kind, e.unit, e.machine_id) for e in await registry.events()]
    assert got == [
        (kinds.LEADER_CHANGED, "", "m1"),
        (kinds.UNIT_SCHEDULED, "web.service", "m2"),
        (kinds.MACHINE_LOST, "", "m2"),
        (kinds.UNIT_PENDING, "web.service", "m1"),
    ]
    messages = [e.message for e in await registry.events()]
    assert "machine m2 lost: no heartbeat within its 5s TTL" in messages
    assert any(m.startswith("web.service pending: ") for m in messages)


async def test_agent_records_join_start_failure_with_result_and_etcd_outage():
    registry = memory_registry()
    systemd = FakeSystemd()
    recorder = Recorder(registry, "m1", clock=Clock())
    events = AgentEvents(recorder, systemd.failure_reason)
    agent = Agent(registry, systemd, Machine("m1", "10.0.0.1", {"role": "web"}), ttl=5, events=events)
    await agent._until_registered()
    digest = await registry.put_unit_file(UnitFile.parse(SLEEP))
    systemd.fail_next_start("bad.service")
    await agent.reconcile(
        [
            Assignment("ok.service", "m1", digest, "launched"),
            Assignment("bad.service", "m1", digest, "launched"),
        ]
    )
    async with asyncio.timeout(5):  # the failure's Result is read from systemd in a task
        while not any(e.kind == kinds.UNIT_FAILED for e in recorder.queued):
            await asyncio.sleep(0.001)
    events.etcd(Unavailable("etcd is unreachable at http://x (ConnectionError)"))
    events.etcd(Unavailable("still"))
    events.etcd(None)
    await recorder.flush()
    got = [(e.kind, e.unit, e.type) for e in await registry.events()]
    assert got == [
        (kinds.MACHINE_JOINED, "", "Normal"),
        (kinds.UNIT_STARTED, "ok.service", "Normal"),
        (kinds.UNIT_FAILED, "bad.service", "Warning"),
        (kinds.ETCD_UNREACHABLE, "", "Warning"),
        (kinds.ETCD_REACHABLE, "", "Normal"),
    ]
    messages = [e.message for e in await registry.events()]
    assert messages[0] == "machine m1 joined (10.0.0.1, role=web)"
    assert messages[2] == "bad.service failed: exit-code: the main process exited with status 1"


async def test_a_new_leader_records_the_old_leaders_lost_machine_once():
    registry = memory_registry()
    for mid in ("m1", "m2"):
        await registry.register_machine(Machine(mid), 60)
    await _submit(registry, "web.service", "[Service]\nExecStart=/bin/true\n[X-Fleet]\nMachineID=m2\n")
    old_leader = Engine(registry, "m2", lease_ttl=5, events=EngineEvents(Recorder(), ttl=5))
    old_leader.events.leading("m2")
    await old_leader.reconcile()
    await registry.remove_machine("m2")  # the leader's own node died with its lease
    recorder = Recorder(registry, "m1", clock=Clock())
    new_leader = Engine(registry, "m1", lease_ttl=5, events=EngineEvents(recorder, ttl=5))
    new_leader.events.leading("m1")
    for _ in range(3):
        await new_leader.reconcile()
    await recorder.flush()
    lost = [(e.machine_id, e.message) for e in await registry.events() if e.kind == kinds.MACHINE_LOST]
    assert lost == [("m2", "machine m2 lost: no heartbeat within its 5s TTL")]


async def _histories_of(registry, *machine_ids: str) -> None:
    for mid in machine_ids:
        recorder = Recorder(registry, mid, clock=Clock())
        recorder.emit(kinds.MACHINE_JOINED, f"machine {mid} joined", machine_id=mid)
        await recorder.flush()


def _leader(registry, clock, retention: float = 3600) -> tuple[Engine, Recorder]:
    recorder = Recorder(registry, "m1", clock=Clock())
    events = EngineEvents(recorder, ttl=5, retention=retention, clock=clock)
    engine = Engine(registry, "m1", lease_ttl=5, clock=clock, events=events)
    events.leading("m1")
    return engine, recorder


def test_histories_expire_after_the_retention_counted_from_when_the_machine_was_first_missing():
    expired, since = expired_histories(["m1", "m2", "m3"], {"m1"}, {"m2": 100.0}, now=150.0, retention=50)
    assert (expired, since) == (["m2"], {"m2": 100.0, "m3": 150.0})
    expired, since = expired_histories(["m1", "m3"], {"m1", "m3"}, since, now=500.0, retention=50)
    assert (expired, since) == ([], {})  # m3 came back: its time gone starts again next time


async def test_the_leader_removes_the_history_of_a_machine_gone_longer_than_the_retention(any_registry):
    registry, clock = any_registry, ManualClock()
    for mid in ("m1", "m2", "m3"):
        await registry.register_machine(Machine(mid), 600)
    await _histories_of(registry, "m2", "m3")
    engine, recorder = _leader(registry, clock, retention=3600)
    await engine.reconcile()
    await registry.remove_machine("m2")  # lost for good
    await engine.reconcile()
    clock.advance(3599)
    await engine.reconcile()
    await recorder.flush()
    assert await registry.event_reporters() == ["m1", "m2", "m3"]
    clock.advance(1)
    await engine.reconcile()
    assert await registry.event_reporters() == ["m1", "m3"]
    events = await registry.events()
    assert "m2" not in {e.reporter for e in events}
    # What happened to m2 stays visible, in the leader's own history.
    lost = [(e.reporter, e.machine_id) for e in events if e.kind == kinds.MACHINE_LOST]
    assert lost == [("m1", "m2")]


async def test_a_machine_back_before_the_retention_keeps_its_history_and_its_time_gone_starts_again():
    registry, clock = memory_registry(clock=ManualClock()), ManualClock()
    for mid in ("m1", "m2"):
        await registry.register_machine(Machine(mid), 10**9)
    await _histories_of(registry, "m2")
    engine, _ = _leader(registry, clock, retention=3600)
    await registry.remove_machine("m2")
    await engine.reconcile()
    clock.advance(3000)
    await registry.register_machine(Machine("m2"), 10**9)
    await engine.reconcile()
    await registry.remove_machine("m2")
    await engine.reconcile()
    clock.advance(3000)
    await engine.reconcile()
    assert "m2" in await registry.event_reporters()
    clock.advance(600)
    await engine.reconcile()
    assert "m2" not in await registry.event_reporters()


async def test_a_retention_of_zero_keeps_histories_for_ever():
    registry, clock = memory_registry(clock=ManualClock()), ManualClock()
    await registry.register_machine(Machine("m1"), 10**9)
    await _histories_of(registry, "m2")
    engine, _ = _leader(registry, clock, retention=0)
    await engine.reconcile()
    clock.advance(10 * 365 * 86400)
    await engine.reconcile()
    assert await registry.event_reporters() == ["m2"]


async def test_failing_to_remove_a_history_never_fails_the_pass_and_is_tried_again():
    class Flaky(Registry):
        failures = 1

        async def delete_events(self, machine_id: str) -> None:
            if self.failures:
                self.failures -= 1
                raise Unavailable("etcd is unreachable (test)")
            await super().delete_events(machine_id)

    clock = ManualClock()
    registry = Flaky(MemoryStore(clock))
    await registry.register_machine(Machine("m1"), 10**9)
    await _histories_of(registry, "m2")
    engine, _ = _leader(registry, clock, retention=60)
    await engine.reconcile()
    clock.advance(60)
    await engine.reconcile()  # the removal fails: the pass goes on
    assert await registry.event_reporters() == ["m2"]
    await engine.reconcile()
    assert await registry.event_reporters() == []
