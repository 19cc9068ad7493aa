"""The agent: pure task planning, and the loop over the in-memory registry and a fake systemd."""

from __future__ import annotations

import asyncio

from fleetpy.agent.agent import Agent, supervise
from fleetpy.agent.tasks import Desired, plan_tasks
from fleetpy.engine.engine import Engine
from fleetpy.registry import Assignment, Machine, Registry, UnitState, memory_registry
from fleetpy.systemd import FakeSystemd, SystemdError
from fleetpy.unit import UnitFile
from tests.test_registry_mirror import CountingStore

SLEEP = "[Service]\nExecStart=/bin/sleep 1000\n"


def test_new_launched_unit_is_written_and_started():
    tasks = plan_tasks({"a.service": Desired(SLEEP, "launched")}, {}, {}, None)
    assert tasks.write == {"a.service": SLEEP} and tasks.start == ["a.service"] and not tasks.stop


def test_loaded_unit_is_written_but_not_started():
    tasks = plan_tasks({"a.service": Desired(SLEEP, "loaded")}, {}, {}, None)
    assert tasks.write and not tasks.start


def test_running_unit_with_same_content_is_adopted_untouched():
    tasks = plan_tasks(
        {"a.service": Desired(SLEEP, "launched")}, {"a.service": SLEEP}, {"a.service": "active"}, None
    )
    assert not tasks


def test_stopped_unit_is_stopped_and_kept():
    tasks = plan_tasks(
        {"a.service": Desired(SLEEP, "loaded")}, {"a.service": SLEEP}, {"a.service": "active"}, set()
    )
    assert tasks.stop == ["a.service"] and not tasks.remove and not tasks.start


def test_unassigned_unit_is_stopped_and_removed():
    tasks = plan_tasks({}, {"a.service": SLEEP}, {"a.service": "active"}, set())
    assert tasks.stop == ["a.service"] and tasks.remove == ["a.service"]


def test_changed_content_restarts_a_running_unit():
    tasks = plan_tasks(
        {"a.service": Desired(SLEEP + "Restart=always\n", "launched")},
        {"a.service": SLEEP},
        {"a.service": "active"},
        {"a.service"},
    )
    assert tasks.stop == ["a.service"] and tasks.start == ["a.service"] and tasks.write


def test_a_failed_unit_is_not_started_again_by_a_later_pass():
    # B13: systemd's Restart= decides restarts, not whichever reconcile comes next.
    for state in ("failed", "inactive"):
        tasks = plan_tasks(
            {"a.service": Desired(SLEEP, "launched")},
            {"a.service": SLEEP},
            {"a.service": state},
            {"a.service"},
        )
        assert not tasks, state


def test_a_failed_unit_found_on_the_first_pass_is_adopted_as_it_is():
    tasks = plan_tasks(
        {"a.service": Desired(SLEEP, "launched")}, {"a.service": SLEEP}, {"a.service": "failed"}, None
    )
    assert not tasks


def test_stopping_a_failed_unit_clears_its_failure():
    tasks = plan_tasks(
        {"a.service": Desired(SLEEP, "loaded")}, {"a.service": SLEEP}, {"a.service": "failed"}, set()
    )
    assert tasks.stop == ["a.service"] and not tasks.start


def test_a_unit_launched_again_after_a_stop_starts_even_if_it_had_failed():
    tasks = plan_tasks(
        {"a.service": Desired(SLEEP, "launched")}, {"a.service": SLEEP}, {"a.service": "failed"}, set()
    )
    assert tasks.start == ["a.service"] and not tasks.write


async def _settle(registry, unit, want, timeout=3.0):
    async def published():
        while True:
            states = {s.unit: s.active_state for s in await registry.states()}
            if states.get(unit) == want:
                return
            await asyncio.sleep(0.002)

    await asyncio.wait_for(published(), timeout)


async def test_agent_runs_what_is_assigned_and_publishes_state():
    registry = memory_registry()
    systemd = FakeSystemd()
    agent = Agent(registry, systemd, Machine("m1", "10.0.0.1"), ttl=5)
    task = asyncio.create_task(agent.run())
    try:
        digest = await registry.put_unit_file(UnitFile.parse(SLEEP))
        await registry.assign(Assignment("a.service", "m1", digest, "launched"))
        await _settle(registry, "a.service", "active")
        assert systemd.files["a.service"] == SLEEP
        assert [m.id for m in await registry.machines()] == ["m1"]

        await registry.assign(Assignment("a.service", "m1", digest, "loaded"))
        await _settle(registry, "a.service", "inactive")

        await registry.unassign("a.service", "m1")
        for _ in range(1500):
            if "a.service" not in systemd.files:
                break
            await asyncio.sleep(0.002)
        assert "a.service" not in systemd.files
        assert await registry.states() == []
    finally:
        task.cancel()


async def test_restarted_agent_adopts_running_units_without_restarting():
    registry = memory_registry()
    systemd = FakeSystemd()
    digest = await registry.put_unit_file(UnitFile.parse(SLEEP))
    await registry.assign(Assignment("a.service", "m1", digest, "launched"))
    first = Agent(registry, systemd, Machine("m1"), ttl=5)
    await first.reconcile(await registry.assignments("m1"))
    pid = await systemd.main_pid("a.service")
    jobs = len(systemd.jobs)

    second = Agent(registry, systemd, Machine("m1"), ttl=5)
    tasks = await second.reconcile(await registry.assignments("m1"))
    assert not tasks
    assert await systemd.main_pid("a.service") == pid and len(systemd.jobs) == jobs


async def test_a_unit_systemd_refuses_does_not_hold_up_the_others():
    registry = memory_registry()
    systemd = FakeSystemd()
    real_start = systemd.start

    async def start(name):
        if name == "bad.service":
            raise SystemdError("org.freedesktop.systemd1.LoadFailed", "Unit bad.service has a bad setting")
        return await real_start(name)

    systemd.start = start
    for name in ("bad.service", "good.service"):
        digest = await registry.put_unit_file(UnitFile.parse(SLEEP.replace("1000", name[:3])))
        await registry.assign(Assignment(name, "m1", digest, "launched"))
    await Agent(registry, systemd, Machine("m1"), ttl=5).reconcile(await registry.assignments("m1"))
    assert (await systemd.unit_state("good.service"))[1] == "active"


async def test_scheduling_a_unit_wakes_only_the_agent_of_its_machine():
    registry = memory_registry()
    agents = {mid: Agent(registry, FakeSystemd(), Machine(mid), ttl=5) for mid in ("m1", "m2", "m3")}
    wakes = dict.fromkeys(agents, 0)
    for mid, agent in agents.items():
        real = agent.reconcile

        async def counted(assignments, mid=mid, real=real):
            wakes[mid] += 1
            return await real(assignments)

        agent.reconcile = counted
    tasks = [asyncio.create_task(a.run()) for a in agents.values()]
    try:
        for _ in range(1500):
            if all(wakes.values()):
                break
            await asyncio.sleep(0.002)
        before = dict(wakes)
        digest = await registry.put_unit_file(UnitFile.parse(SLEEP))
        await registry.assign(Assignment("a.service", "m2", digest, "launched"))
        await _settle(registry, "a.service", "active")
        assert {mid: wakes[mid] - before[mid] for mid in wakes} == {"m1": 0, "m2": 1, "m3": 0}
    finally:
        for task in tasks:
            task.cancel()


async def test_new_units_cost_the_agent_one_read_of_their_files():
    """The unit files of the units that arrived together come in one read; their states go out
    in batches."""
    registry = memory_registry()
    counted = CountingStore(registry.store)
    agent = Agent(Registry(counted, registry.prefix), FakeSystemd(), Machine("m1"), ttl=5)
    task = asyncio.create_task(agent.run())
    try:
        await asyncio.wait_for(agent.reconciled.wait(), 5)
        await asyncio.sleep(0.01)  # the publisher's first (empty) pass and the watch are set up
        digests = [
            await registry.put_unit_file(UnitFile.parse(SLEEP.replace("1000", str(i)))) for i in range(5)
        ]
        counted.calls.clear()
        batch = registry.batch()
        for i, digest in enumerate(digests):
            batch.assign(Assignment(f"u{i}.service", "m1", digest, "launched"))
        await registry.apply(batch)
        for i in range(5):
            await _settle(registry, f"u{i}.service", "active")
        # One read of the files; states in batches (the publisher may take one while starts go on).
        assert counted.calls["get_many"] == 1 and counted.calls["apply"] < 5
        assert not counted.calls["get"]

        await registry.unassign("u0.service", "m1")
        for _ in range(1500):
            if "u0.service" not in {s.unit for s in await registry.states()}:
                break
            await asyncio.sleep(0.002)
        assert "u0.service" not in {s.unit for s in await registry.states()}
        assert (await agent.systemd.unit_state("u1.service"))[1] == "active"
    finally:
        task.cancel()


FAILING = "[Service]\nType=oneshot\nExecStart=/bin/false\n"
TYPO = "[Service]\nExecStrat=/bin/sleep 1000\n"


async def _assign(registry, name: str, text: str, state: str = "launched", machine: str = "m1") -> str:
    digest = await registry.put_unit_file(UnitFile.parse(text))
    await registry.assign(Assignment(name, machine, digest, state))
    return digest


async def _published(registry, agent) -> dict:
    """Let the agent's publisher write what the last reconcile queued, then read the states."""
    # Done when a write has finished and nothing is queued: an empty queue alone only says the
    # publisher took the batch, and a loaded machine may see that before the write lands.
    writes = 0
    write_states = agent._write_states

    async def counted(states):
        nonlocal writes
        try:
            return await write_states(states)
        finally:
            writes += 1

    agent._write_states = counted
    publisher = asyncio.create_task(agent._publish_states())
    try:
        for _ in range(2500):
            await asyncio.sleep(0.002)
            if writes and not agent._to_publish and not agent._publish_wanted.is_set():
                break
    finally:
        publisher.cancel()
        agent._write_states = write_states
    return {s.unit: s for s in await registry.states()}


async def test_a_failed_unit_is_not_restarted_by_an_unrelated_reconcile():
    registry = memory_registry()
    systemd = FakeSystemd()
    agent = Agent(registry, systemd, Machine("m1"), ttl=5)
    await _assign(registry, "broken.service", FAILING)
    await agent.reconcile(await registry.assignments("m1"))
    await _assign(registry, "other.service", SLEEP)
    await agent.reconcile(await registry.assignments("m1"))
    await agent.reconcile(await registry.assignments("m1"))
    assert systemd.jobs.count(("start", "broken.service")) == 1
    assert (await systemd.unit_state("broken.service"))[1] == "failed"

    # fleetctl stop, then start: the user asks for a new start, and gets it.
    await _assign(registry, "broken.service", FAILING, "loaded")
    await agent.reconcile(await registry.assignments("m1"))
    await _assign(registry, "broken.service", FAILING, "launched")
    await agent.reconcile(await registry.assignments("m1"))
    assert systemd.jobs.count(("start", "broken.service")) == 2


async def test_failed_and_unloadable_units_publish_systemds_reason():
    registry = memory_registry()
    agent = Agent(registry, FakeSystemd(), Machine("m1"), ttl=5)
    await _assign(registry, "broken.service", FAILING)
    await _assign(registry, "typo.service", TYPO)
    await _assign(registry, "good.service", SLEEP)
    await agent.reconcile(await registry.assignments("m1"))
    states = await _published(registry, agent)
    assert states["broken.service"].active_state == "failed"
    assert states["broken.service"].reason == "exit-code: the main process exited with status 1"
    assert states["typo.service"].load_state == "bad-setting"
    assert states["typo.service"].reason == "bad-setting: Unit typo.service has a bad unit file setting."
    assert states["good.service"].active_state == "active" and states["good.service"].reason == ""
    assert states["broken.service"].to_json()["reason"] and "reason" not in states["good.service"].to_json()


async def test_a_unit_the_agent_cannot_handle_is_quarantined_and_the_others_run(caplog):
    registry = memory_registry()
    systemd = FakeSystemd()
    real_write = systemd.write_unit

    async def write_unit(name, text):
        if name == "odd.service":
            raise RuntimeError("something nobody expected")
        return await real_write(name, text)

    systemd.write_unit = write_unit
    agent = Agent(registry, systemd, Machine("m1"), ttl=5)
    await registry.assign(Assignment("lost.service", "m1", "0" * 40, "launched"))  # no such unit file
    await _assign(registry, "odd.service", SLEEP.replace("1000", "1001"))
    await _assign(registry, "good.service", SLEEP)
    for _ in range(3):
        await agent.reconcile(await registry.assignments("m1"))
    states = await _published(registry, agent)
    assert states["good.service"].active_state == "active"
    for name, why in (
        ("lost.service", "missing from the registry"),
        ("odd.service", "something nobody expected"),
    ):
        assert (states[name].active_state, states[name].sub_state) == ("failed", "failed")
        assert why in states[name].reason
        assert sum(name in r.message and "quarantined" in r.message for r in caplog.records) == 1

    # Once the cause is gone the unit runs, and its state says so.
    systemd.write_unit = real_write
    await agent.reconcile(await registry.assignments("m1"))
    states = await _published(registry, agent)
    assert states["odd.service"].active_state == "active" and not states["odd.service"].reason


async def test_the_agent_removes_states_of_units_no_longer_assigned_to_it():
    registry = memory_registry()
    # Left by an earlier run of this agent; the engine no longer deletes state/ keys.
    await registry.publish_state(UnitState("old.service", "m1", "x", "loaded", "active", "running"))
    await registry.publish_state(UnitState("old.service", "m2", "x", "loaded", "active", "running"))
    agent = Agent(registry, FakeSystemd(), Machine("m1"), ttl=5)
    await registry.assign(Assignment("lost.service", "m1", "0" * 40, "launched"))
    await agent.reconcile(await registry.assignments("m1"))
    await _published(registry, agent)
    assert {(s.unit, s.machine_id) for s in await registry.states()} == {
        ("old.service", "m2"),
        ("lost.service", "m1"),
    }
    await registry.unassign("lost.service", "m1")
    await agent.reconcile(await registry.assignments("m1"))
    assert {(s.unit, s.machine_id) for s in await registry.states()} == {("old.service", "m2")}


async def test_a_crashed_background_task_is_logged_and_started_again(caplog):
    runs = []

    async def flaky():
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("boom")
        await asyncio.sleep(3600)

    task = asyncio.create_task(supervise("flaky", flaky, pause=0.002))
    for _ in range(500):
        if len(runs) == 2:
            break
        await asyncio.sleep(0.002)
    task.cancel()
    assert len(runs) == 2
    crash = [r for r in caplog.records if "flaky crashed" in r.message]
    assert len(crash) == 1 and crash[0].exc_info and "boom" in str(crash[0].exc_info[1])


async def test_the_heartbeat_survives_an_unexpected_error(monkeypatch):
    monkeypatch.setattr("fleetpy.supervise.RESTART_PAUSE", 0.002)
    registry = memory_registry()
    real_refresh = registry.refresh_machine
    calls = []

    async def refresh(machine_id, ttl):
        calls.append(machine_id)
        if len(calls) == 1:
            raise RuntimeError("a bug in the store")
        return await real_refresh(machine_id, ttl)

    registry.refresh_machine = refresh
    agent = Agent(registry, FakeSystemd(), Machine("m1"), ttl=0.03)
    task = asyncio.create_task(agent.run())
    try:
        for _ in range(1500):
            if len(calls) >= 3:
                break
            await asyncio.sleep(0.002)
        assert len(calls) >= 3 and not task.done()
    finally:
        task.cancel()


async def test_only_the_agent_writes_state_keys_the_engine_leaves_them():
    registry = memory_registry()
    engine = Engine(registry, "m9", lease_ttl=5)
    moved = Assignment("a.service", "m1", "x", "launched")
    await registry.assign(moved)
    await registry.publish_state(UnitState("a.service", "m1", "x", "loaded", "active", "running"))
    await engine.apply([], {}, [moved], {})
    assert await registry.assignments("m1") == []
    # m1's agent stops the unit and removes its state; were m1 dead, the API hides it.
    assert [(s.unit, s.machine_id) for s in await registry.states()] == [("a.service", "m1")]
