"""Health checks for real: the agent on a real systemd --user node and a real etcd checks units
over loopback HTTP, TCP and exec; a failing check restarts the unit (its ExecStartPre log shows
each start), a healthy unit is never restarted, HealthCheckAction=none only marks the unit, and
the health reaches etcd with the unit's state."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from pathlib import Path

import pytest

from fleetpy.agent.agent import Agent
from fleetpy.registry import Assignment, Machine, Registry
from fleetpy.systemd import DbusManager, SystemdError
from fleetpy.unit import UnitFile

pytest_plugins = ["fixtures_nodes"]
pytestmark = pytest.mark.integration

TTL = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def health_of(registry: Registry, name: str) -> dict | None:
    for state in await registry.states():
        if state.unit == name and state.health is not None:
            return state.health.to_json() | {"active": state.active_state}
    return None


async def until(what: str, check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.2)


async def test_failing_check_restarts_healthy_never_restarts_none_only_marks(
    node_factory, v3_registry, tmp_path: Path
) -> None:
    node = node_factory("health")
    registry = v3_registry
    starts = tmp_path / "starts.log"
    flag = tmp_path / "ok"
    web_port, closed_port = free_port(), free_port()
    log_start = f"ExecStartPre=/bin/sh -c 'echo %n >> {starts}'\n"
    units = {
        # Serves HTTP on loopback: its check passes from the first try.
        "web.service": (
            f"[Service]\n{log_start}ExecStart={sys.executable} -m http.server {web_port} --bind 127.0.0.1\n"
            f"[X-Fleet]\nHealthCheckHTTP=http://127.0.0.1:{web_port}/\nHealthCheckInterval=1s\n"
        ),
        # Healthy only while the flag file exists; restarted after 2 failed checks in a row.
        "flaky.service": (
            f"[Service]\n{log_start}ExecStart=/bin/sleep 1000\n"
            f"[X-Fleet]\nHealthCheckExec=/usr/bin/test -f {flag}\nHealthCheckInterval=1s\n"
            "HealthCheckThreshold=2\n"
        ),
        # Nothing listens on its port: only marked unhealthy, never restarted.
        "marked.service": (
            f"[Service]\n{log_start}ExecStart=/bin/sleep 1000\n"
            f"[X-Fleet]\nHealthCheckTCP=127.0.0.1:{closed_port}\nHealthCheckInterval=1s\n"
            "HealthCheckThreshold=1\nHealthCheckAction=none\n"
        ),
    }
    systemd = await DbusManager.connect(node.env["DBUS_SESSION_BUS_ADDRESS"], node.dir / "units")
    agent = Agent(registry, systemd, Machine("m1"), ttl=TTL)
    running = asyncio.create_task(agent.run())
    try:
        for name, text in units.items():
            digest = await registry.put_unit_file(UnitFile.parse(text))
            await registry.assign(Assignment(name, "m1", digest, "launched"))

        async def restarted_twice() -> bool:
            health = await health_of(registry, "flaky.service")
            return health is not None and health["restarts"] >= 2

        await until("flaky.service to be restarted twice", restarted_twice, 60)
        assert (await health_of(registry, "web.service"))["status"] == "healthy"
        marked = await health_of(registry, "marked.service")
        assert marked["status"] == "unhealthy" and marked["restarts"] == 0 and marked["active"] == "active"
        assert marked["message"].startswith(f"TCP 127.0.0.1:{closed_port}: ")

        flag.touch()  # flaky recovers: healthy, and no more restarts

        async def flaky_healthy() -> bool:
            health = await health_of(registry, "flaky.service")
            return health is not None and health["status"] == "healthy"

        await until("flaky.service to be healthy", flaky_healthy, 30)
        restarts = (await health_of(registry, "flaky.service"))["restarts"]
        await asyncio.sleep(4)  # four more check rounds
        assert (await health_of(registry, "flaky.service"))["restarts"] == restarts

        counts = {name: starts.read_text().split().count(name) for name in units}
        assert counts["web.service"] == 1 and counts["marked.service"] == 1, counts
        assert counts["flaky.service"] == restarts + 1, counts
        assert not running.done(), running
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        for name in units:
            with contextlib.suppress(SystemdError):
                await systemd.stop(name)
        await systemd.close()
