"""Self-fencing: an agent that cannot renew its heartbeat stops its fenced units before its TTL
runs out, so the engine moves them only after they stopped."""

from __future__ import annotations

import asyncio

import pytest

from fleetpy.agent.agent import Agent
from fleetpy.fleetd.config import build_config
from fleetpy.registry import Assignment, Machine, ManualClock, Unavailable, memory_registry
from fleetpy.systemd import FakeSystemd
from fleetpy.unit import UnitFile
from fleetpy.unit.errors import InvalidFleetOptions
from fleetpy.unit.fleet import parse_fleet_options

SLEEP = "[Service]\nExecStart=/bin/sleep 1000\n"
# The agent and the memory store read one manual clock, which the tests move: the heartbeat is
# lost, and the record expires, only when a test says so, however loaded the machine. Real time
# only paces the agent's loops (a beat every TTL/3, a fence check every TTL/20).
TTL = 0.15
# Past the share of the TTL after which the agent fences (FENCE_AFTER), and short of the TTL.
FENCED_BY = 0.75 * TTL


def test_the_fence_option_is_a_boolean_of_x_fleet():
    fenced = UnitFile.parse(SLEEP + "[X-Fleet]\nFence=true\n")
    assert parse_fleet_options("a.service", fenced).fence
    assert not parse_fleet_options("a.service", UnitFile.parse(SLEEP)).fence
    with pytest.raises(InvalidFleetOptions, match="Fence='maybe' is not a boolean"):
        parse_fleet_options("a.service", UnitFile.parse(SLEEP + "[X-Fleet]\nFence=maybe\n"))


async def _until(what, check, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.002)


async def _fenced_cluster(fence_flag: bool):
    clock = ManualClock()
    registry = memory_registry(clock=clock)
    systemd = FakeSystemd()
    agent = Agent(registry, systemd, Machine("m1"), ttl=TTL, fence=fence_flag, clock=clock)
    for name, text in (("fenced.service", SLEEP + "[X-Fleet]\nFence=true\n"), ("plain.service", SLEEP)):
        digest = await registry.put_unit_file(UnitFile.parse(text))
        await registry.assign(Assignment(name, "m1", digest, "launched"))
    return registry, systemd, agent, clock


def _active(systemd: FakeSystemd, name: str) -> bool:
    return systemd.states.get(name, ("", "", ""))[1] == "active"


async def test_a_fenced_unit_stops_before_the_ttl_runs_out_and_starts_when_the_heartbeat_is_back():
    registry, systemd, agent, clock = await _fenced_cluster(fence_flag=False)
    alive_when_stopped = []

    def on_change(name, load, active, sub):
        if name == "fenced.service" and active == "inactive":
            # The engine moves units only once the machine record is gone: it must still be here.
            # A state callback cannot await; the memory store's record is read directly.
            registry.store._expire()
            alive_when_stopped.append(registry.key("machines", "m1") in registry.store._entries)

    systemd.on_state_change(on_change)
    running = asyncio.create_task(agent.run())
    try:
        await _until(
            "both units to run",
            lambda: _active(systemd, "fenced.service") and _active(systemd, "plain.service"),
        )
        real_refresh = registry.refresh_machine

        async def partitioned(machine_id, ttl):
            raise Unavailable("etcd is unreachable (a partition)")

        registry.refresh_machine = partitioned
        clock.advance(FENCED_BY)
        await _until("the fenced unit to stop", lambda: not _active(systemd, "fenced.service"))
        assert alive_when_stopped == [True]
        assert _active(systemd, "plain.service")  # not fenced: it runs on, as fleet's units did

        registry.refresh_machine = real_refresh
        await _until("the fenced unit to run again", lambda: _active(systemd, "fenced.service"))
        assert systemd.jobs.count(("start", "fenced.service")) == 2
        assert systemd.jobs.count(("start", "plain.service")) == 1
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_fleetd_fence_flag_fences_every_unit():
    registry, systemd, agent, clock = await _fenced_cluster(fence_flag=True)
    running = asyncio.create_task(agent.run())
    try:
        await _until("both units to run", lambda: _active(systemd, "plain.service"))

        async def partitioned(machine_id, ttl):
            raise Unavailable("etcd is unreachable (a partition)")

        registry.refresh_machine = partitioned
        clock.advance(FENCED_BY)
        await _until(
            "every unit to stop",
            lambda: not _active(systemd, "plain.service") and not _active(systemd, "fenced.service"),
        )
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


def test_the_fence_flag_is_read_from_fleet_conf(tmp_path):
    conf = tmp_path / "fleet.conf"
    conf.write_text("fence=true\n")
    assert build_config({}, environ={}, config_file=str(conf)).fence
    conf.write_text("")
    assert not build_config({}, environ={}, config_file=str(conf)).fence
    assert build_config({"fence": "true"}, environ={}, config_file=str(conf)).fence
