"""A machine's capacity and live facts: parsed from the host's text, published with heartbeats
only when they changed enough, shown by the API."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fleetpy.agent.agent import Agent
from fleetpy.agent.facts import (
    HostFacts,
    cgroup_cpu_limit,
    cgroup_memory_limit,
    changed_enough,
    detect_capacity,
    parse_fact_lines,
    parse_loadavg,
    parse_meminfo,
)
from fleetpy.conf.values import BadValue, parse_capacity
from fleetpy.engine.engine import Engine
from fleetpy.fleetd.config import build_config
from fleetpy.fleetd.daemon import machine_of
from fleetpy.registry import Job, Machine, memory_registry
from fleetpy.systemd import FakeSystemd
from fleetpy.unit import UnitFile
from fleetpy.unit.fleet import parse_constraint

GIB = 1024**3


def test_meminfo_and_loadavg_are_read_as_bytes_and_numbers() -> None:
    meminfo = parse_meminfo(
        "MemTotal:       24576000 kB\nMemAvailable:    1024 kB\nHugePages_Total:       0\n"
    )
    assert meminfo == {"MemTotal": 24576000 * 1024, "MemAvailable": 1024 * 1024, "HugePages_Total": 0}
    assert parse_loadavg("0.52 1.10 2.00 3/512 12345\n") == {"load1": 0.52, "load5": 1.1, "load15": 2.0}


def test_fact_lines_are_key_value_and_bad_lines_are_skipped() -> None:
    text = "# comment\ngpu=tesla\nracks = 4\nnot a fact\nbad key=x\n\nzone=us-east=1\n"
    assert parse_fact_lines(text, "x") == {"gpu": "tesla", "racks": 4.0, "zone": "us-east=1"}


def test_cgroup_limits_lower_the_capacity_read_from_the_host() -> None:
    files = {
        "/sys/fs/cgroup/memory/node1/memory.limit_in_bytes": "2147483648\n",
        "/sys/fs/cgroup/cpu,cpuacct/node1/cpu.cfs_quota_us": "150000\n",
        "/sys/fs/cgroup/cpu,cpuacct/node1/cpu.cfs_period_us": "100000\n",
        "/sys/fs/cgroup/web/memory.max": "max\n",
        "/sys/fs/cgroup/web/cpu.max": "200000 100000\n",
    }
    v1 = "4:memory:/node1\n3:cpu,cpuacct:/node1\n0::/node1\n"
    assert cgroup_memory_limit(v1, files.get) == 2 * GIB
    assert cgroup_cpu_limit(v1, files.get) == 1.5
    v2 = "0::/web\n"
    assert cgroup_memory_limit(v2, files.get) is None  # "max": no limit
    assert cgroup_cpu_limit(v2, files.get) == 2.0
    # v1's "no limit" is a huge number.
    assert (
        cgroup_memory_limit(
            "4:memory:/x\n", {"/sys/fs/cgroup/memory/x/memory.limit_in_bytes": "9223372036854771712"}.get
        )
        is None
    )


def test_capacity_is_read_from_the_host_and_config_overrides_it(tmp_path: Path) -> None:
    host = detect_capacity(str(tmp_path / "units"))
    assert host["cpus"] >= 1 and host["memory"] > 0 and host["disk"] > 0
    assert parse_capacity("cpus=150%,memory=1.5G") == {"cpus": 1.5, "memory": 1.5 * GIB}
    with pytest.raises(BadValue, match="use cpus, memory, disk"):
        parse_capacity("gpus=1")
    config = build_config(
        {"capacity": "memory=2G", "machine_id": "m1", "unit_dir": str(tmp_path)}, environ={}
    )
    machine = machine_of(config)
    assert machine.capacity["memory"] == 2 * GIB and machine.capacity["cpus"] == host["cpus"]


def test_only_changes_that_matter_are_worth_a_write() -> None:
    base = {"os": "linux", "memory": 10.0 * GIB, "memory_free": 5.0 * GIB, "load1": 1.0, "gpu": "a"}
    assert not changed_enough(base, {**base, "load1": 1.4, "memory_free": 5.4 * GIB})
    assert changed_enough(base, {**base, "load1": 1.5})
    # A high load moves by a tenth of itself before it matters.
    assert not changed_enough({**base, "load1": 15.0}, {**base, "load1": 16.4})
    assert changed_enough({**base, "load1": 15.0}, {**base, "load1": 16.5})
    assert changed_enough(base, {**base, "memory_free": 4.4 * GIB})
    assert changed_enough(base, {**base, "gpu": "b"})
    assert changed_enough(base, {k: v for k, v in base.items() if k != "gpu"})


async def test_host_facts_hold_uname_capacity_load_and_free_memory(tmp_path: Path) -> None:
    facts = await HostFacts({"cpus": 2.0, "memory": 4.0 * GIB}, str(tmp_path), str(tmp_path / "none")).read()
    assert facts["os"] == "linux" and facts["cpus"] == 2.0 and facts["memory"] == 4.0 * GIB
    assert {
        "arch",
        "kernel",
        "hostname",
        "load1",
        "load5",
        "load15",
        "memory_free",
        "disk_free",
    } <= facts.keys()


@pytest.mark.integration
async def test_facts_d_executables_add_facts_and_a_failing_one_is_skipped(tmp_path: Path) -> None:
    facts_dir = tmp_path / "facts.d"
    facts_dir.mkdir()
    (facts_dir / "gpu").write_text("#!/bin/sh\necho gpu=tesla\necho gpus=2\n")
    (facts_dir / "broken").write_text("#!/bin/sh\necho half=done\nexit 3\n")
    (facts_dir / "notes.txt").write_text("not=executable\n")
    for name in ("gpu", "broken"):
        (facts_dir / name).chmod(0o755)
    facts = await HostFacts({}, str(tmp_path), str(facts_dir)).read()
    assert facts["gpu"] == "tesla" and facts["gpus"] == 2.0
    assert "half" not in facts and "not" not in facts


class FakeFacts:
    def __init__(self, facts: dict):
        self.facts = facts

    async def read(self) -> dict:
        return dict(self.facts)


async def test_the_agent_publishes_facts_with_a_heartbeat_only_when_they_changed_enough() -> None:
    registry = memory_registry()
    writes = []
    beats = []  # every write of the machine record, and every keepalive
    register, refresh = registry.register_machine, registry.refresh_machine

    async def counting(machine: Machine, ttl: float) -> None:
        writes.append(dict(machine.facts))
        beats.append(machine.id)
        await register(machine, ttl)

    async def keepalive(machine_id: str, ttl: float) -> bool:
        beats.append(machine_id)
        return await refresh(machine_id, ttl)

    registry.register_machine = counting  # type: ignore[method-assign]

    registry.refresh_machine = keepalive  # type: ignore[method-assign]
    source = FakeFacts({"load1": 0.1, "gpu": "none"})
    agent = Agent(registry, FakeSystemd(), Machine("m1"), ttl=0.06, facts=source, facts_interval=0.005)
    task = asyncio.create_task(agent.run())
    try:
        async with asyncio.timeout(5):
            while not await registry.machines():
                await asyncio.sleep(0.005)
            assert (await registry.machines())[0].facts == {"load1": 0.1, "gpu": "none"}
            source.facts["load1"] = 0.3  # under the step: heartbeats stay keepalives
            # Three beats, each after the agent read the facts again (every 5 ms).
            beaten = len(beats) + 3
            while len(beats) < beaten:
                await asyncio.sleep(0.005)
            # (On a loaded machine a beat can come after the 60 ms TTL: the agent registers
            # again, with the facts it published, never with the change under the step.)
            assert {w["load1"] for w in writes} == {0.1}
            source.facts["gpu"] = "tesla"
            while (await registry.machines())[0].facts.get("gpu") != "tesla":
                await asyncio.sleep(0.005)
            assert writes[-1] == {"load1": 0.3, "gpu": "tesla"}
            assert [w for w in writes if w != {"load1": 0.1, "gpu": "none"}] == [writes[-1]]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_a_change_under_the_step_matters_when_it_crosses_what_a_pending_unit_asks() -> None:
    base = {"load1": 1.8, "memory_free": 5.0 * GIB, "memory": 10.0 * GIB}
    asked = [parse_constraint("load1<2"), parse_constraint("memory_free>=5.2G")]
    assert not changed_enough(base, {**base, "load1": 1.9}, asked)
    assert changed_enough(base, {**base, "load1": 2.1}, asked)
    assert not changed_enough(base, {**base, "load1": 2.1})
    assert changed_enough(base, {**base, "memory_free": 5.3 * GIB}, asked)


async def test_the_engine_names_what_pending_units_ask_and_the_agent_publishes_a_crossing() -> None:
    registry = memory_registry()
    await registry.register_machine(Machine("m0", capacity={"memory": GIB}, facts={"load1": 2.2}), ttl=30)
    for name, text in (("busy.service", "load1<2"), ("placed.service", "load1<9")):
        unit = UnitFile.parse(f"[Service]\nExecStart=/bin/true\n[X-Fleet]\nMachineConstraint={text}\n")
        await registry.create_job(Job(name, await registry.put_unit_file(unit), "launched"))
    engine = Engine(registry, "m0", lease_ttl=5)
    await engine.reconcile()
    # Only what pending units ask: placed units are not moved by facts.
    assert await registry.asked_facts() == ["load1<2"]

    source = FakeFacts({"load1": 2.2})
    agent = Agent(registry, FakeSystemd(), Machine("m1"), ttl=0.06, facts=source, facts_interval=0.005)
    task = asyncio.create_task(agent.run())
    try:
        async with asyncio.timeout(5):
            while len(await registry.machines()) < 2:
                await asyncio.sleep(0.005)
            source.facts["load1"] = 1.95  # under the 0.5 step, but busy.service waits for it
            while {m.id: m for m in await registry.machines()}["m1"].facts.get("load1") != 1.95:
                await asyncio.sleep(0.005)
        await engine.reconcile()
        assert [a.machine_id for a in await registry.assignments() if a.unit == "busy.service"] == ["m1"]
        assert await registry.asked_facts() == []
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
