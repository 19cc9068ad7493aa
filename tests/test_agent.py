"""The agent: pure task planning, and the loop over the in-memory registry and a fake systemd."""

from __future__ import annotations

import asyncio

from fleetpy.agent.agent import Agent
from fleetpy.agent.tasks import Desired, plan_tasks
from fleetpy.registry import Assignment, Machine, memory_registry
from fleetpy.registry.aio import AsyncRegistry
from fleetpy.systemd import FakeSystemd, SystemdError
from fleetpy.unit import UnitFile

SLEEP = "[Service]\nExecStart=/bin/sleep 1000\n"


def test_new_launched_unit_is_written_and_started():
    tasks = plan_tasks({"a.service": Desired(SLEEP, "launched")}, {}, {})
    assert tasks.write == {"a.service": SLEEP} and tasks.start == ["a.service"] and not tasks.stop


def test_loaded_unit_is_written_but_not_started():
    tasks = plan_tasks({"a.service": Desired(SLEEP, "loaded")}, {}, {})
    assert tasks.write and not tasks.start


def test_running_unit_with_same_content_is_adopted_untouched():
    tasks = plan_tasks(
        {"a.service": Desired(SLEEP, "launched")}, {"a.service": SLEEP}, {"a.service": "active"}
    )
    assert not tasks


def test_stopped_unit_is_stopped_and_kept():
    tasks = plan_tasks({"a.service": Desired(SLEEP, "loaded")}, {"a.service": SLEEP}, {"a.service": "active"})
    assert tasks.stop == ["a.service"] and not tasks.remove and not tasks.start


def test_unassigned_unit_is_stopped_and_removed():
    tasks = plan_tasks({}, {"a.service": SLEEP}, {"a.service": "active"})
    assert tasks.stop == ["a.service"] and tasks.remove == ["a.service"]


def test_changed_content_restarts_a_running_unit():
    tasks = plan_tasks(
        {"a.service": Desired(SLEEP + "Restart=always\n", "launched")},
        {"a.service": SLEEP},
        {"a.service": "active"},
    )
    assert tasks.stop == ["a.service"] and tasks.start == ["a.service"] and tasks.write


def test_failed_launched_unit_is_started_again():
    tasks = plan_tasks(
        {"a.service": Desired(SLEEP, "launched")}, {"a.service": SLEEP}, {"a.service": "failed"}
    )
    assert tasks.start == ["a.service"] and not tasks.write


async def _settle(registry, unit, want, timeout=3.0):
    async def published():
        while True:
            states = {s.unit: s.active_state for s in await registry.states()}
            if states.get(unit) == want:
                return
            await asyncio.sleep(0.01)

    await asyncio.wait_for(published(), timeout)


async def test_agent_runs_what_is_assigned_and_publishes_state():
    registry = AsyncRegistry(memory_registry())
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
        for _ in range(300):
            if "a.service" not in systemd.files:
                break
            await asyncio.sleep(0.01)
        assert "a.service" not in systemd.files
        assert await registry.states() == []
    finally:
        task.cancel()


async def test_restarted_agent_adopts_running_units_without_restarting():
    registry = AsyncRegistry(memory_registry())
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
    registry = AsyncRegistry(memory_registry())
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
    registry = AsyncRegistry(memory_registry())
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
        for _ in range(300):
            if all(wakes.values()):
                break
            await asyncio.sleep(0.01)
        before = dict(wakes)
        digest = await registry.put_unit_file(UnitFile.parse(SLEEP))
        await registry.assign(Assignment("a.service", "m2", digest, "launched"))
        await _settle(registry, "a.service", "active")
        assert {mid: wakes[mid] - before[mid] for mid in wakes} == {"m1": 0, "m2": 1, "m3": 0}
    finally:
        for task in tasks:
            task.cancel()
