"""Benchmark: what one unit launch costs the cluster, on a real etcd, on each registry backend.

An engine and N agents (fake systemd, so only fleetpy and etcd are measured) run in one
process, each with its own etcd client. Units are started one at a time; for each we measure
submit -> published "active" state, count every etcd round trip by who made it (an HTTP request
on v2, an RPC on v3; a watch counts once, however long it waits), and count how many agents
woke up. Both backends run in the same run against the same etcd 3.4 (v2 on). The baseline is
the floor any etcd-based scheduler pays: one write seen by one watcher.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections import Counter
from pathlib import Path

from bench.common import etcd, summary
from fleetpy.agent.agent import Agent
from fleetpy.engine.engine import Engine
from fleetpy.registry import Job, Machine, Registry
from fleetpy.registry.etcd2 import EtcdV2Store
from fleetpy.registry.etcd3 import EtcdV3Store
from fleetpy.systemd import FakeSystemd
from fleetpy.unit import UnitFile


class CountingV2Store(EtcdV2Store):
    """Counts HTTP requests (made from worker threads)."""

    def __init__(self, url: str, counts: Counter, who: str):
        super().__init__([url])
        self._counts, self._who = counts, who
        self._lock = threading.Lock()

    def _call_blocking(self, operation):
        with self._lock:
            self._counts[self._who] += 1
        return super()._call_blocking(operation)


class CountingV3Store(EtcdV3Store):
    """Counts RPCs."""

    def __init__(self, url: str, counts: Counter, who: str):
        super().__init__([url])
        self._counts, self._who = counts, who

    async def _call(self, operation):
        self._counts[self._who] += 1
        return await super()._call(operation)


STORES = {"v2": CountingV2Store, "v3": CountingV3Store}


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def baseline(url: str, rounds: int) -> list[float]:
    """One write, observed by one watcher: the floor of any launch."""
    registry = Registry(EtcdV3Store([url]), "/bench-baseline/")
    samples = []
    for i in range(rounds):
        index = await registry.index()
        watch = asyncio.create_task(registry.wait(index, "probe"))
        await asyncio.sleep(0.005)  # let the long poll reach etcd first
        started = time.perf_counter()
        await registry.store.put(registry.key("probe", "key"), str(i))
        await watch
        samples.append(time.perf_counter() - started)
    await registry.close()
    return samples


async def launches(url: str, backend: str, machines: int, units: int) -> dict:
    counts: Counter = Counter()
    prefix = f"/bench-launch-{backend}/"
    registries: list[Registry] = []

    def registry(who: str) -> Registry:
        registries.append(Registry(STORES[backend](url, counts, who), prefix))
        return registries[-1]

    api = registry("api")
    watcher = registry("measuring")
    await api.ensure_schema()
    rss_before = rss_mib()
    agents = [
        Agent(registry("agents"), FakeSystemd(), Machine(f"m{i:04d}", f"10.0.{i // 250}.{i % 250}"), 30)
        for i in range(machines)
    ]
    engine = Engine(registry("engine"), "m0000", lease_ttl=30, reconcile_interval=3600)
    tasks = [asyncio.create_task(a.run()) for a in agents] + [asyncio.create_task(engine.run())]
    while len(await api.machines()) < machines or not engine.leading.is_set():
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # let every agent's first reconcile and watch settle

    reconciles = 0

    def count_reconcile(agent: Agent):
        original = agent.reconcile

        async def counted(assignments):
            nonlocal reconciles
            reconciles += 1
            return await original(assignments)

        agent.reconcile = counted

    for agent in agents:
        count_reconcile(agent)
    rss_running = rss_mib()

    counts.clear()
    latencies = []
    for i in range(units):
        name = f"bench{i}.service"
        unit_file = UnitFile.parse(f"[Service]\nExecStart=/bin/sleep {1000 + i}\n")
        index = await watcher.index()
        started = time.perf_counter()
        await api.submit(unit_file, Job(name, unit_file.hash, "launched"))
        while True:  # wake on state writes (one watch, kept open on v3)
            if any(s.active_state == "active" for s in await watcher.states() if s.unit == name):
                break
            index = await watcher.wait(index, "state", timeout=10) or index
        latencies.append(time.perf_counter() - started)
    ops = dict(counts)
    rss_after = rss_mib()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for each in registries:
        await each.close()
    # The API's submit (fleetd's API also reads the job first: one more); the measuring
    # loop's own requests are not counted.
    per_launch = {who: round(ops.get(who, 0) / units, 2) for who in ("api", "engine", "agents")}
    return {
        "backend": backend,
        "machines": machines,
        "units": units,
        "submit_to_active": summary(latencies),
        "etcd_round_trips_per_launch": {**per_launch, "total": round(sum(per_launch.values()), 2)},
        "agent_wakeups_per_launch": round(reconciles / units, 2),
        # One process hosts the engine and every agent, so these are per-component costs.
        "memory": {
            "process_before_mib": round(rss_before, 1),
            "per_agent_kib": round((rss_running - rss_before) * 1024 / machines, 1),
            "per_unit_kib": round((rss_after - rss_running) * 1024 / units, 1),
        },
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--machines", type=int, help="simulated agents (default 50; --quick 5)")
    parser.add_argument("--units", type=int, help="units started one at a time (default 100; --quick 5)")


async def main_async(machines: int, units: int) -> dict:
    with etcd() as url:
        floor = summary(await baseline(url, units))
        runs = [await launches(url, backend, machines, units) for backend in sorted(STORES)]
    for each in runs:
        each["launch_over_baseline"] = round(each["submit_to_active"]["p50_ms"] / floor["p50_ms"], 1)
    return {"baseline_one_write_one_watcher": floor, "backends": runs}


def run(args: argparse.Namespace) -> dict:
    return asyncio.run(
        main_async(args.machines or (5 if args.quick else 50), args.units or (5 if args.quick else 100))
    )


def render(result: dict) -> str:
    b = result["baseline_one_write_one_watcher"]
    lines = [f"baseline (1 write, 1 watch): p50 {b['p50_ms']} ms  p95 {b['p95_ms']} ms"]
    for each in result["backends"]:
        s, ops, memory = each["submit_to_active"], each["etcd_round_trips_per_launch"], each["memory"]
        lines += [
            f"-- etcd {each['backend']}: {each['machines']} machines, {each['units']} units started one at a time",
            f"submit -> active:          p50 {s['p50_ms']} ms  p95 {s['p95_ms']} ms"
            f"  ({each['launch_over_baseline']}x baseline)",
            f"etcd round trips / launch: {ops['total']} (api {ops['api']}, engine {ops['engine']}, "
            f"agents {ops['agents']})",
            f"agents woken per launch:   {each['agent_wakeups_per_launch']} of {each['machines']}",
            f"memory: process {memory['process_before_mib']} MiB before, {memory['per_agent_kib']} KiB per "
            f"agent, {memory['per_unit_kib']} KiB per unit",
        ]
    return "\n".join(lines)
