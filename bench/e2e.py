"""Benchmark: many units launched at once through a real etcd onto many simulated agents.

The real engine and N real agents (fake systemd, so fleetpy and etcd are what is measured) run
in one process, each with its own etcd client. All units are submitted at once, as concurrent
API writes; we measure the time until every unit reports running and count etcd requests per
unit by who made them. The baseline, against the same etcd in the same run, is the raw write
rate: concurrent PUTs of one small key each, from as many client threads.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import time
from collections import Counter

from bench.common import etcd, summary
from bench.launch import CountingV2Store
from fleetpy.agent.agent import Agent
from fleetpy.engine.engine import Engine
from fleetpy.registry import Job, Machine, Registry
from fleetpy.registry.etcd2 import EtcdV2Store
from fleetpy.systemd import FakeSystemd
from fleetpy.unit import UnitFile

PREFIX = "/bench-e2e/"
WRITERS = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--machines", type=int, help="simulated agents (default 1000; --quick 10)")
    parser.add_argument("--units", type=int, help="units submitted at once (default 10000; --quick 100)")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")


def raw_write_rate(url: str, writes: int) -> float:
    """PUTs per second from WRITERS threads, each with its own client."""
    stores = [EtcdV2Store([url]) for _ in range(WRITERS)]

    def put(i: int) -> None:
        stores[i % WRITERS]._call_blocking(lambda c: c.write(f"/bench-raw/{i}", "x" * 64))

    with concurrent.futures.ThreadPoolExecutor(WRITERS) as pool:
        started = time.perf_counter()
        list(pool.map(put, range(writes)))
        return writes / (time.perf_counter() - started)


def observe(registry: Registry, started: float, units: int, timeout: float, running_at: dict) -> None:
    """Record when each unit is first seen active, sampling every 0.25 s."""
    while len(running_at) < units and time.perf_counter() - started < timeout:
        now = time.perf_counter() - started
        # A thread of its own, so an event loop of its own for each read (the v2 store is
        # made of threads, so it serves any loop).
        for state in asyncio.run(registry.states()):
            if state.active_state == "active" and state.unit not in running_at:
                running_at[state.unit] = now
        time.sleep(0.25)


async def launch_all(url: str, machines: int, units: int, timeout: float) -> dict:
    asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(WRITERS))
    counts: Counter = Counter()

    def registry(who: str) -> Registry:
        return Registry(CountingV2Store(url, counts, who), PREFIX)

    api, observer = registry("api"), registry("observer")
    watcher = Registry(EtcdV2Store([url]), PREFIX)
    await api.ensure_schema()
    agents = [
        Agent(
            registry("agents"),
            FakeSystemd(),
            Machine(f"m{i:05d}", f"10.{i // 62500}.{i // 250 % 250}.{i % 250}"),
            60,
        )
        for i in range(machines)
    ]
    engine = Engine(registry("engine"), "m00000", lease_ttl=30, reconcile_interval=3600)
    tasks = [asyncio.create_task(a.run()) for a in agents] + [asyncio.create_task(engine.run())]
    try:
        while len(await observer.machines()) < machines or not engine.leading.is_set():
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # let every agent's first reconcile and watch settle
        counts.clear()

        files = [UnitFile.parse(f"[Service]\nExecStart=/bin/sleep {100000 + i}\n") for i in range(units)]
        started = time.perf_counter()
        await asyncio.gather(*(api.put_unit_file(f) for f in files))
        await asyncio.gather(
            *(api.create_job(Job(f"e2e{i}.service", f.hash, "launched")) for i, f in enumerate(files))
        )
        submitted = time.perf_counter() - started
        running_at: dict[str, float] = {}
        # The observer samples from a thread of its own: on the event loop it would queue behind
        # a thousand agents' registry calls and see every unit late.
        await asyncio.get_running_loop().run_in_executor(
            concurrent.futures.ThreadPoolExecutor(1), observe, watcher, started, units, timeout, running_at
        )
        elapsed = max(running_at.values(), default=float("nan"))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    work = counts["api"] + counts["engine"] + counts["agents"]
    return {
        "machines": machines,
        "units": units,
        "running": len(running_at),
        "submit_s": round(submitted, 2),
        "all_running_s": round(elapsed, 2),
        "units_per_s": round(len(running_at) / elapsed, 1),
        "running_after": summary(list(running_at.values())) if running_at else {},
        "running_after_s": sorted(round(t, 2) for t in running_at.values()),
        "etcd_requests_per_unit": {
            "api": round(counts["api"] / units, 2),
            "engine": round(counts["engine"] / units, 2),
            "agents": round(counts["agents"] / units, 2),
            "all": round(work / units, 2),
        },
    }


def run(args: argparse.Namespace) -> dict:
    machines = args.machines or (10 if args.quick else 1000)
    units = args.units or (100 if args.quick else 10000)
    with etcd() as url:
        baseline = raw_write_rate(url, min(units, 5000))
        result = asyncio.run(launch_all(url, machines, units, args.timeout))
    result["baseline_etcd_writes_per_s"] = round(baseline, 1)
    result["units_per_s_over_raw_writes"] = round(result["units_per_s"] / baseline, 3)
    return result


def render(result: dict) -> str:
    ops = result["etcd_requests_per_unit"]
    after = result["running_after"]
    return "\n".join(
        [
            f"{result['units']} units submitted at once onto {result['machines']} simulated agents",
            f"submitted in {result['submit_s']} s; {result['running']} running after {result['all_running_s']} s "
            f"({result['units_per_s']} units/s; p50 {after.get('p50_ms')} ms, p95 {after.get('p95_ms')} ms)",
            f"baseline: raw etcd writes {result['baseline_etcd_writes_per_s']}/s "
            f"-> launches = {result['units_per_s_over_raw_writes']}x raw writes",
            f"etcd requests per unit: api {ops['api']}, engine {ops['engine']}, agents {ops['agents']}, all {ops['all']}",
        ]
    )
