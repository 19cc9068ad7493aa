"""A cluster on etcd's v3 API alone: etcd started as it ships (v2 off), three fleetds (agent and
engine each, built as `fleetd` builds them, over FakeSystemd) each with a v3 registry of its own.
It schedules, moves units when a machine is lost, and goes on after etcd restarts."""

from __future__ import annotations

import asyncio
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from fleetpy.fleetd.config import Config
from fleetpy.fleetd.daemon import build_fleetd
from fleetpy.lab.etcd import initial_cluster, start_cluster
from fleetpy.registry import Job, Registry
from fleetpy.registry.etcd3 import EtcdV3Store
from fleetpy.systemd import FakeSystemd
from fleetpy.unit import UnitFile

pytestmark = pytest.mark.integration

TTL = 2
PREFIX = "/v3-only/"


@pytest.fixture
def etcd_without_v2():
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="fleetpy-etcd-v3only-") as base:
        members = start_cluster(Path(base))  # v2 off, as etcd ships
        try:
            yield members
        finally:
            for member in members:
                member.stop()


async def _until(what: str, check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_a_cluster_on_v3_alone_schedules_moves_units_and_survives_an_etcd_restart(etcd_without_v2):
    member = etcd_without_v2[0]
    with pytest.raises(OSError):  # v2 is really off
        urllib.request.urlopen(f"{member.client_url}/v2/keys/", timeout=2)
    url = member.client_url
    registries = [Registry(EtcdV3Store([url]), PREFIX) for _ in range(4)]
    observer, fleetd_registries = registries[0], registries[1:]
    await observer.ensure_schema()
    machines = [f"{i:032x}" for i in range(1, 4)]
    fleetds = {
        machine: asyncio.create_task(
            build_fleetd(
                Config(machine_id=machine, agent_ttl=TTL, engine_reconcile_interval=5), r, FakeSystemd()
            ).run()
        )
        for machine, r in zip(machines, fleetd_registries, strict=True)
    }
    try:
        await _until("three machines", lambda: _count(observer.machines(), 3))
        names = [f"web@{i}.service" for i in range(1, 7)]
        for name in names:
            unit = UnitFile.parse(f"[Service]\nExecStart=/bin/web {name}\n")
            await observer.submit(unit, Job(name, unit.hash, "launched"))
        await _until("six units active", lambda: _active(observer, names))
        placed = {a.unit: a.machine_id for a in await observer.assignments()}
        assert set(placed.values()) == set(machines)  # spread over all three

        # Lose a machine: its fleetd stops heartbeating; its units move to the others.
        lost = placed["web@1.service"]
        fleetds.pop(lost).cancel()
        await _until(
            "the lost machine's units to move",
            lambda: _placed_off(observer, names, lost),
            timeout=TTL * 5 + 10,
        )
        await _until("six units active again", lambda: _active(observer, names, avoid=lost))

        # etcd restarts (same data): the fleetds reconnect, and a new unit is scheduled.
        member.stop()
        await asyncio.sleep(1)
        member.start(initial_cluster(etcd_without_v2), log=member.data_dir.parent / "restart.log")
        await _until("etcd to answer again", lambda: asyncio.to_thread(member.healthy))
        extra = UnitFile.parse("[Service]\nExecStart=/bin/web after\n")
        await observer.submit(extra, Job("after.service", extra.hash, "launched"))
        await _until(
            "a unit submitted after the restart to run", lambda: _active(observer, ["after.service"])
        )
        await _until("the units to stay where they were", lambda: _placed_off(observer, names, lost))
        assert all(not task.done() for task in fleetds.values()), fleetds
    finally:
        for task in fleetds.values():
            task.cancel()
        await asyncio.gather(*fleetds.values(), return_exceptions=True)
        for registry in registries:
            await registry.close()


async def _count(machines, n: int) -> bool:
    return len(await machines) == n


async def _active(registry: Registry, names: list[str], avoid: str | None = None) -> bool:
    active = {s.unit for s in await registry.states() if s.active_state == "active" and s.machine_id != avoid}
    return set(names) <= active


async def _placed_off(registry: Registry, names: list[str], lost: str) -> bool:
    placed = {a.unit: a.machine_id for a in await registry.assignments()}
    return set(names) <= placed.keys() and lost not in {placed[n] for n in names}
