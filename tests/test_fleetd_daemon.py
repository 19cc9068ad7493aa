"""fleetd's builder and supervisor: the real agent and engine over the memory registry and
FakeSystemd, and the fleetd command against a real etcd."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import time

import pytest

from fleetpy.fleetd.config import Config
from fleetpy.fleetd.daemon import build_fleetd
from fleetpy.registry import Job, MemoryStore, Registry, memory_registry
from fleetpy.supervise import supervise
from fleetpy.systemd import FakeSystemd
from fleetpy.unit import UnitFile

M1 = "1" * 32


async def _until(predicate, timeout=5.0):
    async def check():
        while not await predicate():
            await asyncio.sleep(0.002)

    await asyncio.wait_for(check(), timeout)


async def test_supervise_logs_each_failure_with_its_traceback_and_starts_the_task_again(caplog):
    runs = []

    async def flaky():
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError(f"failure {len(runs)}")
        await asyncio.Event().wait()

    task = asyncio.create_task(supervise("flaky", flaky, pause=0.002))
    await _until(lambda: _is(len(runs) == 3))
    task.cancel()
    failures = [r for r in caplog.records if "flaky crashed" in r.getMessage()]
    assert [str(r.exc_info[1]) for r in failures] == ["failure 1", "failure 2"]
    assert all(r.levelno == logging.ERROR for r in failures)


async def _is(value):
    return value


async def test_a_crashed_engine_is_logged_and_started_again_beside_the_agent(caplog):
    registry = memory_registry()
    systemd = FakeSystemd()
    fleetd = build_fleetd(Config(machine_id=M1, agent_ttl=30), registry, systemd)
    fleetd.restart_pause = 0.01
    real_run, runs = fleetd.engine.run, []

    async def broken_once():
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("engine bug at start")
        await real_run()

    fleetd.engine.run = broken_once
    task = asyncio.create_task(fleetd.run())
    try:
        digest = await registry.put_unit_file(UnitFile.parse("[Service]\nExecStart=/bin/true\n"))
        await registry.create_job(Job("a.service", digest, "launched"))
        await _until(lambda: _is(systemd.states.get("a.service", ("",) * 3)[1] == "active"))
        failure = next(r for r in caplog.records if "engine crashed" in r.getMessage())
        assert "engine bug at start" in str(failure.exc_info[1])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.integration
def test_fleetd_waits_for_systemd_instead_of_exiting_and_stops_at_once(etcd_url, etcd_prefix, tmp_path):
    # fleetd exits only on a bad configuration; a systemd manager not up yet is not one.
    missing_bus = f"unix:path={tmp_path}/no-bus"
    argv = [sys.executable, "-m", "fleetpy.fleetd.main", "--etcd-servers", etcd_url]
    argv += ["--etcd-key-prefix", etcd_prefix, "--machine-id", M1, "--systemd-bus", missing_bus]
    argv += ["--unit-dir", str(tmp_path / "units"), "--api-socket", str(tmp_path / "fleet.sock")]
    fleetd = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        log = ""
        while "waiting for systemd" not in log and fleetd.poll() is None and time.monotonic() < deadline:
            log += fleetd.stderr.readline()
        assert fleetd.poll() is None, log + fleetd.stderr.read()
        assert "waiting for systemd" in log
    finally:
        fleetd.send_signal(signal.SIGTERM)
        fleetd.wait(5)
    bad = subprocess.run([*argv[:3], "--agent-ttl", "-5s"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "agent" in bad.stderr.lower(), bad.stderr


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_stopping_fleetd_leaves_its_machine_a_whole_ttl_to_come_back():
    # Restarting fleetd must not outlast what was left of the TTL since the last heartbeat.
    clock = ManualClock()
    registry = Registry(MemoryStore(clock))
    fleetd = build_fleetd(Config(machine_id=M1, agent_ttl=30), registry, FakeSystemd(), clock)
    task = asyncio.create_task(fleetd.run())
    await _until(lambda: _has_machines(registry, 1))
    clock.now = 20.0  # the heartbeat (every 10 s of real time) has not come yet
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    clock.now = 45.0
    assert await _has_machines(registry, 1)
    clock.now = 51.0
    assert await _has_machines(registry, 0)


async def _has_machines(registry, count):
    return len(await registry.machines()) == count
