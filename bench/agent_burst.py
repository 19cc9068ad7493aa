"""Benchmark: one agent launching, then destroying, a burst of units on a real systemd.

The real agent (in this process, over a real etcd and a real systemd --user manager in a lab
node) gets N assignments at once: the time until every unit's published state is active, then,
all unassigned at once, until no unit and no state is left. The baseline, in the same run, is
the raw floor: the same N units written, linked, started and stopped by DbusManager alone,
with nothing published. D-Bus calls are counted per unit for both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from bench.common import etcd, table
from fleetpy.agent.agent import Agent
from fleetpy.registry import Assignment, Machine, Registry
from fleetpy.registry.etcd2 import EtcdV2Store
from fleetpy.systemd import DbusManager
from fleetpy.unit import UnitFile

SLEEP = "[Service]\nExecStart=/bin/sleep 100000\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--units", type=int, help="units in the burst (default 500; --quick 20)")


class CallCounter:
    """Counts the manager's D-Bus calls (each awaits one reply)."""

    def __init__(self, manager: DbusManager) -> None:
        self.calls = 0
        real = manager._call

        async def counted(*args, **kwargs):
            self.calls += 1
            return await real(*args, **kwargs)

        manager._call = counted


async def _until(check, timeout: float = 600) -> float:
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"not done after {timeout} s")
        await asyncio.sleep(0.05)
    return round(time.monotonic() - started, 2)


async def raw_floor(bus: str, unit_dir: Path, names: list[str]) -> dict:
    manager = await DbusManager.connect(bus, unit_dir)
    counter = CallCounter(manager)
    try:
        started = time.monotonic()
        for name in names:
            await manager.write_unit(name, SLEEP)
        await manager.link(names)
        await asyncio.gather(*(manager.start(n) for n in names))
        launch = round(time.monotonic() - started, 2)
        started = time.monotonic()
        await asyncio.gather(*(manager.stop(n) for n in names))
        await manager.remove_units(names)
        destroy = round(time.monotonic() - started, 2)
    finally:
        await manager.close()
    return {
        "launch_s": launch,
        "destroy_s": destroy,
        "dbus_calls_per_unit": round(counter.calls / len(names), 2),
    }


async def agent_burst(bus: str, unit_dir: Path, url: str, names: list[str]) -> dict:
    registry = Registry(EtcdV2Store([url]), f"/bench-agent-{time.time_ns()}/")
    manager = await DbusManager.connect(bus, unit_dir)
    counter = CallCounter(manager)
    agent = Agent(registry, manager, Machine("m1"), ttl=10)
    running = asyncio.create_task(agent.run())
    try:
        digest = await registry.put_unit_file(UnitFile.parse(SLEEP))
        await agent.reconciled.wait()
        calls_before = counter.calls

        async def all_active() -> bool:
            states = await registry.states()
            return sum(s.active_state == "active" for s in states) == len(names)

        async def all_gone() -> bool:
            return not await registry.states() and not await manager.installed_units()

        started = time.monotonic()
        await asyncio.gather(*(registry.assign(Assignment(n, "m1", digest, "launched")) for n in names))
        await _until(all_active)
        launch = round(time.monotonic() - started, 2)
        started = time.monotonic()
        await asyncio.gather(*(registry.unassign(n, "m1") for n in names))
        await _until(all_gone)
        destroy = round(time.monotonic() - started, 2)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await manager.close()
    return {
        "launch_s": launch,
        "destroy_s": destroy,
        "dbus_calls_per_unit": round((counter.calls - calls_before) / len(names), 2),
    }


def run(args: argparse.Namespace) -> dict:
    from fleetpy.lab.node import start_node

    count = args.units or (20 if args.quick else 500)
    names = [f"burst{i}.service" for i in range(count)]
    with tempfile.TemporaryDirectory(prefix="fpab", dir="/tmp") as base, etcd() as url:
        node = start_node("agentburst", Path(base), journald=False)
        try:
            bus = node.env["DBUS_SESSION_BUS_ADDRESS"]
            floor = asyncio.run(raw_floor(bus, Path(base) / "raw", names))
            agent = asyncio.run(agent_burst(bus, Path(base) / "units", url, names))
        finally:
            node.kill()
    return {
        "units": count,
        "rows": [{"what": "raw DbusManager (baseline)", **floor}, {"what": "agent via etcd", **agent}],
    }


def render(result: dict) -> str:
    return f"{result['units']} units at once on one node\n" + table(result["rows"])


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m bench.agent_burst", description=__doc__.splitlines()[0])
    cli.add_argument("--quick", action="store_true", help="a short burst that checks the benchmark works")
    cli.add_argument("--json", action="store_true", help="print the result as JSON only")
    add_arguments(cli)
    options = cli.parse_args()
    outcome = run(options)
    print(json.dumps(outcome) if options.json else render(outcome))
