"""A burst of launches and destroys on one real node: the agent's D-Bus flow control."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest

from fleetpy.agent.agent import Agent
from fleetpy.registry import Assignment, Machine, Registry
from fleetpy.systemd import DbusManager
from fleetpy.unit import UnitFile

pytest_plugins = ["fixtures_nodes"]
pytestmark = pytest.mark.integration

BURST = 500
TTL = 5.0  # the lab's failover TTL


def _unit(log: Path) -> UnitFile:
    # %n is the unit's own name: the log gets one line per start of each unit.
    return UnitFile.parse(
        f"[Service]\nExecStartPre=/bin/sh -c 'echo %n >> {log}'\nExecStart=/bin/sleep 1000\n"
    )


async def _until(what: str, check, timeout: float, agent: asyncio.Task | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if agent is not None and agent.done():
            raise AssertionError(f"the agent stopped while waiting for {what}: {agent!r}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.2)


async def test_500_launches_then_500_destroys_run_each_unit_once(node_factory, etcd_registry):
    node = node_factory("burst")
    log = node.dir / "starts.log"
    registry = etcd_registry
    systemd = await DbusManager.connect(node.env["DBUS_SESSION_BUS_ADDRESS"], node.dir / "units")
    agent = Agent(registry, systemd, Machine("m1"), ttl=TTL)
    running = asyncio.create_task(agent.run())
    expired = []

    async def watch_heartbeat():
        # The machine record must never lapse: an expired record makes the engine move units.
        while True:
            await asyncio.sleep(TTL / 3)
            if "m1" not in {m.id for m in await registry.machines()}:
                expired.append(time.monotonic())

    try:
        await _until("the machine to register", lambda: _registered(registry), 10)
        beats = asyncio.create_task(watch_heartbeat())
        digest = await registry.put_unit_file(_unit(log))
        names = [f"b{i}.service" for i in range(BURST)]
        await asyncio.gather(*(registry.assign(Assignment(n, "m1", digest, "launched")) for n in names))

        async def all_active():
            states = await registry.states()
            return sum(s.active_state == "active" for s in states) == BURST

        await _until("every unit to run", all_active, 240, running)
        await asyncio.gather(*(registry.unassign(n, "m1") for n in names))

        async def all_gone():
            return not await registry.states() and not await systemd.installed_units()

        await _until("every unit to be removed", all_gone, 240, running)
        listed = node.run(["systemctl", "--user", "list-units", "--all", "--plain", "b*.service"]).stdout
        assert "b1.service" not in listed, listed
        assert not running.done(), running
        starts = Counter(log.read_text().split())
        assert len(starts) == BURST and set(starts.values()) == {1}, starts.most_common(3)

        # Still responsive: a new unit runs.
        await registry.assign(Assignment("after.service", "m1", digest, "launched"))

        async def after_runs():
            return any(
                s.unit == "after.service" and s.active_state == "active" for s in await registry.states()
            )

        await _until("a unit launched after the burst to run", after_runs, 20, running)
        beats.cancel()
        assert not expired, f"the machine record lapsed {len(expired)} times"
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await systemd.close()


async def _registered(registry: Registry) -> bool:
    return bool(await registry.machines())
