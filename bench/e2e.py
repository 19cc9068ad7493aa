"""Benchmark: many units launched at once through a real etcd onto many simulated agents.

The real engine and N real agents (fake systemd, so fleetpy and etcd are what is measured) run
in one process, each with its own etcd client. All units are submitted at once, as concurrent
API writes; a watch in a thread of its own notes when each unit is first scheduled and first
reports running, and etcd requests per unit are counted by who made them. In the same run and
against the same etcd: the engine as it was (every pass re-reads the registry; the baseline),
then the event-fed engine (one listing, then a watch-fed copy), and the raw etcd write rate:
concurrent writes of one small key each, from as many clients.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import time
from collections import Counter

from bench.common import etcd, summary
from bench.launch import STORES
from fleetpy.agent.agent import Agent
from fleetpy.engine.engine import Engine
from fleetpy.registry import HistoryLost, Job, Machine, Registry
from fleetpy.registry.etcd2 import EtcdV2Store
from fleetpy.registry.etcd3 import EtcdV3Store
from fleetpy.systemd import FakeSystemd
from fleetpy.unit import UnitFile

WRITERS = 32
ENGINES = {"rereading": False, "event-fed": True}  # Engine(mirrored=...)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--machines", type=int, help="simulated agents (default 1000; --quick 10)")
    parser.add_argument("--units", type=int, help="units submitted at once (default 10000; --quick 100)")
    parser.add_argument("--api", choices=sorted(STORES), default="v3", help="etcd API (default v3)")
    parser.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help=f"which engines to run, in order (default {','.join(ENGINES)})",
    )
    parser.add_argument(
        "--backlog",
        action="store_true",
        help="submit every unit before the engine starts, and time from its start (no API in the way)",
    )
    parser.add_argument(
        "--no-agents",
        action="store_true",
        help="machines registered but no agent running: time submit -> scheduled alone",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")


def raw_write_rate(url: str, api: str, writes: int) -> float:
    """Writes per second of one small key each, WRITERS at a time, each writer its own client."""
    if api == "v2":
        stores = [EtcdV2Store([url]) for _ in range(WRITERS)]

        def put(i: int) -> None:
            stores[i % WRITERS]._call_blocking(lambda c: c.write(f"/bench-raw/{i}", "x" * 64))

        with concurrent.futures.ThreadPoolExecutor(WRITERS) as pool:
            started = time.perf_counter()
            list(pool.map(put, range(writes)))
            return writes / (time.perf_counter() - started)

    async def writes_v3() -> float:
        stores = [EtcdV3Store([url]) for _ in range(WRITERS)]
        gate = asyncio.Semaphore(WRITERS)

        async def put(i: int) -> None:
            async with gate:
                await stores[i % WRITERS].put(f"/bench-raw/{i}", "x" * 64)

        await asyncio.gather(*(s.index("/bench-raw/") for s in stores))  # connected
        started = time.perf_counter()
        await asyncio.gather(*(put(i) for i in range(writes)))
        rate = writes / (time.perf_counter() - started)
        for store in stores:
            await store.close()
        return rate

    return asyncio.run(writes_v3())


class Observer:
    """Notes when each unit is first scheduled and first reports active, from one prefix watch
    in a process of its own: on the event loop it would queue behind a thousand agents, and in
    a thread it took a share of the GIL from what it measures (time.perf_counter is the
    system's monotonic clock, the same in both processes)."""

    def __init__(self, url: str, api: str, prefix: str, units: int, running: bool = True):
        self.url, self.api, self.prefix, self.units = url, api, prefix, units
        self.running = running  # whether to wait until units run, or only until they are scheduled
        self.started = 0.0
        self.scheduled_at: dict[str, float] = {}
        self.running_at: dict[str, float] = {}
        self.index = 0

    def run(self, timeout: float) -> tuple[dict[str, float], dict[str, float]]:
        """When each unit was scheduled, and when each ran (in the process it runs in)."""
        asyncio.run(self._watch(timeout))
        return self.scheduled_at, self.running_at

    async def _watch(self, timeout: float) -> None:
        store = (EtcdV2Store if self.api == "v2" else EtcdV3Store)([self.url])
        index = self.index
        while (
            len(self.running_at if self.running else self.scheduled_at) < self.units
            and time.perf_counter() - self.started < timeout
        ):
            try:
                changes = await store.changes(self.prefix, index, timeout=1.0)
            except HistoryLost:
                # Behind: read what is there now (a unit seen late is noted late, never early).
                index = await store.index(self.prefix)
                self._note(list((await store.list(self.prefix)).items()))
                continue
            if changes:
                index = changes[-1].index
                self._note([(c.key, c.value) for c in changes if c.value is not None])
        await store.close()

    def _note(self, records: list[tuple[str, str]]) -> None:
        now = time.perf_counter() - self.started
        for key, value in records:
            parts = key[len(self.prefix) :].split("/")
            if parts[0] == "schedule":
                self.scheduled_at.setdefault(parts[2], now)
            elif (
                parts[0] == "state"
                and parts[1] not in self.running_at
                and json.loads(value).get("systemdActiveState") == "active"
            ):
                self.running_at[parts[1]] = now


def _imported() -> None:
    """Run in the observer's process to have this module (and grpc, fleetpy) imported there."""


async def launch_all(
    url: str,
    api: str,
    mirrored: bool,
    machines: int,
    units: int,
    timeout: float,
    backlog: bool = False,
    agents: bool = True,
) -> dict:
    """With `backlog`, every unit is submitted before the engine starts, and the clock starts
    with the engine: what the engine (and the agents) do, without the API's submits. Without
    `agents`, machines are only registered: the run measures scheduling alone."""
    asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(WRITERS))
    counts: Counter = Counter()
    prefix = f"/bench-e2e-{'event-fed' if mirrored else 'rereading'}/"
    registries: list[Registry] = []

    def registry(who: str) -> Registry:
        registries.append(Registry(STORES[api](url, counts, who), prefix))
        return registries[-1]

    api_registry = registry("api")
    await api_registry.ensure_schema()
    agents_on = agents
    agents = [
        Agent(
            registry("agents"),
            FakeSystemd(),
            Machine(f"m{i:05d}", f"10.{i // 62500}.{i // 250 % 250}.{i % 250}"),
            60,
        )
        for i in range(machines)
    ]
    engine = Engine(registry("engine"), "m00000", lease_ttl=30, reconcile_interval=3600, mirrored=mirrored)
    tasks = [asyncio.create_task(a.run()) for a in agents] if agents_on else []
    if not agents_on:
        for agent in agents:
            await agent.registry.register_machine(agent.machine, 3600)
    if not backlog:
        tasks.append(asyncio.create_task(engine.run()))
    observer = Observer(url, api, prefix, units, running=agents_on)
    # Started, with this module imported there, before the clock: its start-up is not counted.
    watcher = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    watcher.submit(_imported).result()
    submitted_at: dict[str, float] = {}
    files = [UnitFile.parse(f"[Service]\nExecStart=/bin/sleep {100000 + i}\n") for i in range(units)]
    gate = asyncio.Semaphore(WRITERS)

    async def submit(i: int, unit_file: UnitFile) -> None:
        async with gate:  # as many requests at once as a busy API would have
            await api_registry.submit(unit_file, Job(f"e2e{i}.service", unit_file.hash, "launched"))
            submitted_at[f"e2e{i}.service"] = time.perf_counter() - observer.started

    try:
        while len(await api_registry.machines()) < machines or not (backlog or engine.leading.is_set()):
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # let every agent's first reconcile and watch settle
        observer.index = await api_registry.index()
        if backlog:
            await asyncio.gather(*(submit(i, f) for i, f in enumerate(files)))
            observer.index = await api_registry.index()
        counts.clear()
        observer.started = started = time.perf_counter()
        watching = asyncio.get_running_loop().run_in_executor(watcher, observer.run, timeout)
        if backlog:
            tasks.append(asyncio.create_task(engine.run()))
            submitted_at = dict.fromkeys(submitted_at, 0.0)
        else:
            await asyncio.gather(*(submit(i, f) for i, f in enumerate(files)))
        submitted = time.perf_counter() - started
        observer.scheduled_at, observer.running_at = await watching
    finally:
        watcher.shutdown(cancel_futures=True)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for each in registries:
            await each.close()
    scheduled, running = observer.scheduled_at, observer.running_at
    all_scheduled = max(scheduled.values(), default=float("nan"))
    all_running = max(running.values(), default=float("nan"))
    work = counts["api"] + counts["engine"] + counts["agents"]
    latencies = [t - submitted_at[u] for u, t in scheduled.items() if u in submitted_at]
    return {
        "engine": "event-fed" if mirrored else "rereading",
        "backlog": backlog,
        "agents": agents_on,
        "machines": machines,
        "units": units,
        "submit_s": round(submitted, 2),
        "scheduled": len(scheduled),
        "all_scheduled_s": round(all_scheduled, 2),
        "scheduled_per_s": round(len(scheduled) / all_scheduled, 1),
        "running": len(running),
        "all_running_s": round(all_running, 2),
        "units_per_s": round(len(running) / all_running, 1) if running else None,
        "scheduled_after": summary(list(scheduled.values())) if scheduled else {},
        # Each unit from its submit's answer to its assignment: the engine's own latency.
        "submit_to_scheduled": summary(latencies) if latencies else {},
        "running_after": summary(list(running.values())) if running else {},
        "running_after_s": sorted(round(t, 2) for t in running.values()),
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
    engines = [name.strip() for name in args.engines.split(",")]
    with etcd() as url:
        baseline = raw_write_rate(url, args.api, min(units, 5000))
        runs = [
            asyncio.run(
                launch_all(
                    url,
                    args.api,
                    ENGINES[name],
                    machines,
                    units,
                    args.timeout,
                    args.backlog,
                    not args.no_agents,
                )
            )
            for name in engines
        ]
    # The last engine (the event-fed one by default) is the headline; each run keeps its own.
    result = {
        **runs[-1],
        "api": args.api,
        "runs": [{k: v for k, v in r.items() if k != "running_after_s"} for r in runs],
    }
    result["baseline_etcd_writes_per_s"] = round(baseline, 1)
    result["units_per_s_over_raw_writes"] = round(
        (result["units_per_s"] or result["scheduled_per_s"]) / baseline, 3
    )
    return result


def render(result: dict) -> str:
    lines = [
        f"{result['units']} units submitted at once onto {result['machines']} simulated agents, etcd {result['api']}",
        f"baseline: raw etcd writes {result['baseline_etcd_writes_per_s']}/s",
    ]
    for each in result["runs"]:
        ops, after, sched = each["etcd_requests_per_unit"], each["running_after"], each["scheduled_after"]
        lines += [
            f"-- engine {each['engine']}: submitted in {each['submit_s']} s",
            f"   all {each['scheduled']} scheduled after {each['all_scheduled_s']} s ({each['scheduled_per_s']} units/s;"
            f" p50 {sched.get('p50_ms')} ms, p95 {sched.get('p95_ms')} ms)",
            f"   all {each['running']} running after {each['all_running_s']} s ({each['units_per_s']} units/s;"
            f" p50 {after.get('p50_ms')} ms, p95 {after.get('p95_ms')} ms)",
            f"   submit -> scheduled, each unit: p50 {each['submit_to_scheduled'].get('p50_ms')} ms,"
            f" p95 {each['submit_to_scheduled'].get('p95_ms')} ms",
            f"   etcd requests per unit: api {ops['api']}, engine {ops['engine']}, agents {ops['agents']}, all {ops['all']}",
        ]
    return "\n".join(lines)
