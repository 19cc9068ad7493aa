"""Local volumes for real: two real systemd --user nodes, their agents and an engine on a real
etcd. A unit writes into its volume; stopped and started again it goes back to the machine its
volume lives on (though the other machine is less loaded) and finds its file; with that machine
gone it stays pending with the reason; once the volume is forgotten it starts afresh elsewhere.
Also the registry's volume records on every backend."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from fleetpy.agent.agent import Agent
from fleetpy.engine.engine import Engine
from fleetpy.registry import Job, Machine, Registry
from fleetpy.systemd import DbusManager, SystemdError
from fleetpy.unit import UnitFile

pytest_plugins = ["fixtures_nodes"]
pytestmark = pytest.mark.integration

TTL = 5.0
M1, M2 = "a1" * 16, "b2" * 16  # M1 sorts first: the engine's tie goes to it
# The volume's path comes in twice: as an argument through systemd's ${} (as `podman run -v
# ${FLEET_VOLUME_data}:/data` gets it) and in the environment; the unit checks they agree.
SCRIPT = """\
dir="$1"
[ -n "$dir" ] && [ "$dir" = "$FLEET_VOLUME_data" ] || exit 3
if [ -f "$dir/seen" ]; then echo again >> "$dir/seen"; else echo first > "$dir/seen"; fi
exec sleep 1000
"""


async def until(what: str, check, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.2)


async def test_a_unit_keeps_its_volume_machine_waits_for_it_and_moves_once_it_is_forgotten(
    node_factory, v3_registry: Registry, tmp_path: Path
) -> None:
    registry = v3_registry
    script = tmp_path / "db.sh"
    script.write_text(SCRIPT)
    nodes = {mid: node_factory(name) for mid, name in ((M1, "vol1"), (M2, "vol2"))}
    volumes = {mid: node.dir / "volumes" for mid, node in nodes.items()}
    systemds = {
        mid: await DbusManager.connect(node.env["DBUS_SESSION_BUS_ADDRESS"], node.dir / "units")
        for mid, node in nodes.items()
    }
    agents = {
        mid: Agent(registry, systemds[mid], Machine(mid), ttl=TTL, volume_dir=volumes[mid]) for mid in nodes
    }
    running = {mid: asyncio.create_task(agent.run()) for mid, agent in agents.items()}
    engine = Engine(registry, "engine-only", TTL)
    db = UnitFile.parse(
        f"[Service]\nExecStart=/bin/sh {script} ${{FLEET_VOLUME_data}}\n[X-Fleet]\nVolume=data\n"
    )
    busy = UnitFile.parse(f"[Service]\nExecStart=/bin/sleep 1000\n[X-Fleet]\nMachineID={M1}\n")

    async def active_on(mid: str) -> bool:
        await engine.reconcile()
        states = [s for s in await registry.states() if s.unit == "db.service"]
        # A lost machine's last state record lingers beside the new one.
        return (mid, "active") in [(s.machine_id, s.active_state) for s in states]

    def seen(mid: str) -> list[str]:
        path = volumes[mid] / "data" / "seen"
        return path.read_text().split() if path.exists() else []

    try:
        await until("both machines", lambda: _machines(registry, 2))
        await registry.submit(db, Job("db.service", db.hash, "launched"))
        await until("db.service active on the first machine", lambda: active_on(M1))
        assert seen(M1) == ["first"] and await registry.volumes() == {"data": M1}

        # Stopped, the first machine made busier, started again: back to its volume.
        await registry.set_desired_state("db.service", "inactive")
        await until("db.service stopped", lambda: _no_state(engine, registry))
        await registry.submit(busy, Job("busy.service", busy.hash, "launched"))
        await registry.set_desired_state("db.service", "launched")
        await until("db.service active on its volume's machine", lambda: active_on(M1))
        assert seen(M1) == ["first", "again"] and seen(M2) == []
        assert {a.unit: a.machine_id for a in await registry.assignments()} == {
            "db.service": M1,
            "busy.service": M1,
        }

        # The first machine goes away: db waits for it, with the reason.
        running.pop(M1).cancel()
        await systemds.pop(M1).close()
        nodes[M1].kill()
        await registry.remove_machine(M1)
        plan = await engine.reconcile()
        reason = (await registry.pending())["db.service"]
        assert "volume data lives on" in reason and "a machine that is gone" in reason, reason
        assert "fleetctl volume rm data" in reason and str(plan.pending["db.service"]) == reason
        assert await registry.assignments() == []  # busy.service too: its MachineID is gone
        assert not await _has_state(registry, M2)

        # Forgotten, it starts afresh on the other machine, whose agent records it there.
        assert await registry.forget_volume("data")
        await until("db.service active on the other machine", lambda: active_on(M2))
        assert seen(M2) == ["first"] and await registry.volumes() == {"data": M2}
    finally:
        for task in running.values():
            task.cancel()
        await asyncio.gather(*running.values(), return_exceptions=True)
        for systemd in systemds.values():
            for name in ("db.service", "busy.service"):
                with contextlib.suppress(SystemdError, OSError, EOFError, TimeoutError):
                    await asyncio.wait_for(systemd.stop(name), 5)
            with contextlib.suppress(Exception):
                await systemd.close()


async def _machines(registry: Registry, count: int) -> bool:
    return len(await registry.machines()) == count


async def _no_state(engine: Engine, registry: Registry) -> bool:
    await engine.reconcile()
    return not any(s.unit == "db.service" for s in await registry.states())


async def _has_state(registry: Registry, mid: str) -> bool:
    return any(s.unit == "db.service" and s.machine_id == mid for s in await registry.states())


async def test_a_volume_is_claimed_once_and_forgotten_on_every_backend(any_registry: Registry) -> None:
    assert await any_registry.claim_volume("data", M1) == M1
    assert await any_registry.claim_volume("data", M2) == M1
    assert await any_registry.volumes() == {"data": M1}
    assert await any_registry.forget_volume("data")
    assert not await any_registry.forget_volume("data")
    assert await any_registry.claim_volume("data", M2) == M2
