"""Benchmark: leader failover, from the leader's fleetd killed to a new leader scheduling.

Three fleetds (the real fleetd built by `build_fleetd`, with fake systemd) run as processes of
their own against a real etcd (v3), with the agent TTL (which is also the leader lease) set to
each TTL measured. For each round the leader's process is killed with SIGKILL (no resignation:
its lease must run out) and a unit is submitted at once; we time how long until the leader key
names another machine and until the new leader has scheduled the unit. The floor is the TTL
itself: a killed leader's lease lasts until it expires.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.common import etcd, summary
from fleetpy.registry import Job, Registry
from fleetpy.registry.etcd3 import EtcdV3Store
from fleetpy.unit import UnitFile

NODES = 3
PREFIX = "/bench-failover/"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ttls", default="5,10", help="agent TTLs (= leader leases) in seconds (default 5,10)"
    )
    parser.add_argument("--rounds", type=int, help="leader kills per TTL (default 3; --quick 1)")


def start_node(url: str, prefix: str, machine: str, ttl: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.failover", "--node", url, prefix, machine, str(ttl)],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def node(url: str, prefix: str, machine: str, ttl: float) -> None:
    """One fleetd with fake systemd: its agent and its engine, as fleetd builds them."""
    from fleetpy.fleetd.config import Config
    from fleetpy.fleetd.daemon import build_fleetd
    from fleetpy.systemd import FakeSystemd

    registry = Registry(EtcdV3Store([url]), prefix)
    await registry.ensure_schema()
    config = Config(etcd_servers=(url,), machine_id=machine, public_ip="127.0.0.1", agent_ttl=ttl)
    await build_fleetd(config, registry, FakeSystemd()).run()


async def rounds(url: str, ttl: float, count: int) -> list[dict]:
    prefix = f"{PREFIX}ttl{ttl:g}/"
    registry = Registry(EtcdV3Store([url]), prefix)
    await registry.ensure_schema()
    machines = [f"{i:032x}" for i in range(1, NODES + 1)]
    processes = {m: start_node(url, prefix, m, ttl) for m in machines}
    results = []
    try:
        for n in range(count):
            leader = None
            while leader is None or len(await registry.machines()) < NODES:
                leader = await registry.leader()
                await asyncio.sleep(0.05)
            # Let the leader settle (its first pass done) before the kill.
            await asyncio.sleep(1.0)
            unit_file = UnitFile.parse(f"[Service]\nExecStart=/bin/sleep {1000 + n}\n")
            name = f"probe{n}.service"
            processes[leader].send_signal(signal.SIGKILL)
            processes[leader].wait()
            killed = time.perf_counter()
            await registry.submit(unit_file, Job(name, unit_file.hash, "launched"))
            new_leader_s = scheduled_s = None
            while scheduled_s is None:
                now = time.perf_counter() - killed
                if new_leader_s is None and (await registry.leader()) not in (None, leader):
                    new_leader_s = now
                if any(a.unit == name for a in await registry.assignments()):
                    scheduled_s = now
                if now > 10 * ttl:
                    raise RuntimeError(f"no new leader scheduled {name} within {10 * ttl:g} s")
                await asyncio.sleep(0.02)
            results.append(
                {"new_leader_s": round(new_leader_s or scheduled_s, 2), "scheduled_s": round(scheduled_s, 2)}
            )
            # The killed fleetd comes back (as a restarted machine would), so every round has
            # NODES machines.
            processes[leader] = start_node(url, prefix, leader, ttl)
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGKILL)
            process.wait()
        await registry.close()
    return results


async def main_async(ttls: list[float], count: int) -> dict:
    with etcd() as url:
        runs = []
        for ttl in ttls:
            found = await rounds(url, ttl, count)
            runs.append(
                {
                    "ttl_s": ttl,
                    "rounds": found,
                    "new_leader": summary([r["new_leader_s"] for r in found]),
                    "scheduled": summary([r["scheduled_s"] for r in found]),
                    "max_scheduled_s": max(r["scheduled_s"] for r in found),
                }
            )
    return {"nodes": NODES, "ttls": runs}


def run(args: argparse.Namespace) -> dict:
    ttls = [float(t) for t in args.ttls.split(",")]
    count = args.rounds or (1 if args.quick else 3)
    if args.quick:
        ttls = [min(ttls)]
    return asyncio.run(main_async(ttls, count))


def render(result: dict) -> str:
    lines = [f"{result['nodes']} fleetds (fake systemd) on a real etcd v3; the leader's process SIGKILLed"]
    for each in result["ttls"]:
        lines.append(
            f"TTL {each['ttl_s']:g} s: new leader p50 {each['new_leader']['p50_ms'] / 1000:.2f} s, "
            f"unit scheduled p50 {each['scheduled']['p50_ms'] / 1000:.2f} s, max {each['max_scheduled_s']} s "
            f"(floor: the TTL, {each['ttl_s']:g} s; {each['scheduled']['n']} rounds)"
        )
    return "\n".join(lines)


if __name__ == "__main__" and sys.argv[1:2] == ["--node"]:
    _, _, url, prefix, machine, ttl = sys.argv
    asyncio.run(node(url, prefix, machine, float(ttl)))
