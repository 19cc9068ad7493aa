"""Benchmark: 60 units, then single starts, on a real 3-node lab, on each etcd backend (v2, v3), in one run.

For each backend a fresh lab (`fleetpy lab up --etcd-api v2|v3`: real etcd 3.4 with TLS, client
certificates and auth, three real systemd --user managers, three fleetds) runs on loopback
addresses. The units are started as a user starts them, one `fleetctl start` process with 60
local unit files; the time runs until every one is active in its node's systemd, as the agents
publish it (an etcd watch in the bench), and until fleetctl returned.
The baseline, in the same run, is systemd alone: the same unit files started straight in the
same three managers (one `systemctl --user start` per node, in parallel), with no fleet at all.

Then single starts, one after another: a whole `fleetctl start UNIT` process (a local unit file,
as a user runs it) until the unit's state is published active, and until fleetctl returned
(which watches a started unit STARTUP_GRACE longer for an immediate failure). Their baseline is
a raw StartUnit over D-Bus on one node, through the class fleetd's agent uses, until its job is
done: the floor under any scheduler.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from bench.common import summary, table
from bench.gofleet import raw_baseline
from fleetpy.client import Client
from fleetpy.lab.lab import Lab
from fleetpy.unit import UnitFile

BACKENDS = ("v2", "v3")
NODES = 3
UNIT = "[Service]\nExecStart=/bin/sleep {n}\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--units", type=int, help="units to start (default 60; --quick 6)")
    parser.add_argument("--singles", type=int, help="single starts timed (default 50; --quick 3)")


def wait_for(what: str, check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout} s")
        time.sleep(0.05)


class ActiveWatch:
    """When each unit's state was first published active, from a watch on the lab's etcd."""

    def __init__(self, lab: Lab):
        self.first_active: dict[str, float] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._follow(lab)), daemon=True)
        self._thread.start()
        self._ready.wait(10)

    async def _follow(self, lab: Lab) -> None:
        registry = lab.registry(retry_for=5)
        prefix = registry.key("state")
        try:
            index = await registry.store.index(prefix)
            self._ready.set()
            while not self._stop.is_set():
                for change in await registry.store.changes(prefix, index, 0.5):
                    index = max(index, change.index)
                    if change.value and '"systemdActiveState": "active"' in change.value:
                        name = change.key[len(prefix) + 1 :].split("/")[0]
                        self.first_active.setdefault(name, time.monotonic())
        finally:
            await registry.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def fleet_launch(lab: Lab, units: int, watch: ActiveWatch) -> dict:
    """`fleetctl start` of `units` local unit files: seconds until all are active, and until
    fleetctl returned."""
    names = [f"b{i}.service" for i in range(units)]
    with tempfile.TemporaryDirectory(prefix="fbl-many-") as work:
        for i, name in enumerate(names):
            Path(work, name).write_text(UNIT.format(n=100000 + i))
        started = time.monotonic()
        run = fleetctl(lab, work, "start", *names)
        returned = time.monotonic() - started
    assert run.returncode == 0, run.stderr
    wait_for(f"{units} units active", lambda: all(n in watch.first_active for n in names), 300)
    took = max(watch.first_active[n] for n in names) - started
    client = Client(lab.endpoint(), timeout=60)
    by_machine = Counter(s["machineID"] for s in client.unit_states() if s["name"] in names)
    client.close()
    return {
        "all_active_s": round(took, 2),
        "fleetctl_returned_s": round(returned, 2),
        "per_node": sorted(by_machine.values(), reverse=True),
    }


def fleetctl(lab: Lab, work: str, *args: str) -> subprocess.CompletedProcess:
    """A whole fleetctl process, in `work` (where the local unit files are)."""
    return subprocess.run(
        [sys.executable, "-m", "fleetpy.cli.fleetctl", *args],
        cwd=work,
        env=dict(os.environ, FLEETCTL_ENDPOINT=lab.endpoint()),
        capture_output=True,
        text=True,
    )


def systemd_launch(lab: Lab, units: int) -> dict:
    """The same unit files started by each node's systemd directly (a third each), in parallel."""
    assert lab.state is not None
    nodes = [lab.node(ns.name) for ns in lab.state.nodes]
    share = {node.name: [i for i in range(units) if i % len(nodes) == k] for k, node in enumerate(nodes)}

    def prepare(node) -> list[str]:
        unit_dir = node.dir / "bench-units"
        unit_dir.mkdir(exist_ok=True)
        names = []
        for i in share[node.name]:
            name = f"base{i}.service"
            (unit_dir / name).write_text(UnitFile.parse(UNIT.format(n=200000 + i)).to_text())
            names.append(name)
        node.run(["systemctl", "--user", "link", *(str(unit_dir / n) for n in names)], check=True)
        return names

    def start(node, names: list[str]) -> None:
        node.run(["systemctl", "--user", "start", *names], check=True)

    with concurrent.futures.ThreadPoolExecutor(len(nodes)) as pool:
        names = dict(zip((n.name for n in nodes), pool.map(prepare, nodes), strict=True))
        started = time.monotonic()
        list(pool.map(lambda node: start(node, names[node.name]), nodes))
        took = time.monotonic() - started
        for node in nodes:
            node.run(["systemctl", "--user", "stop", *names[node.name]])
    return {"all_active_s": round(took, 2)}


def single_starts(lab: Lab, runs: int, watch: ActiveWatch) -> dict:
    """`fleetctl start` of one new unit, one after another: until published active, and until
    fleetctl returned."""
    to_active, returned = [], []
    client = Client(lab.endpoint(), timeout=60)
    with tempfile.TemporaryDirectory(prefix="fbl-units-") as work:
        for i in range(runs):
            name = f"one{i}.service"
            Path(work, name).write_text(UNIT.format(n=300000 + i))
            started = time.monotonic()
            run = fleetctl(lab, work, "start", name)
            returned.append(time.monotonic() - started)
            assert run.returncode == 0, run.stderr
            wait_for(f"{name} active", lambda n=name: n in watch.first_active, 30)
            to_active.append(watch.first_active[name] - started)
            client.destroy_unit(name)
    client.close()
    return {"to_active": summary(to_active), "fleetctl_returned": summary(returned)}


def measure(api: str, units: int, singles: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="fbl-") as base:
        lab = Lab(Path(base))
        started = time.monotonic()
        try:
            lab.up(node_count=NODES, network="loopback", agent_ttl="10s", containers=False, etcd_api=api)
            up_s = round(time.monotonic() - started, 2)
            baseline = systemd_launch(lab, units)
            watch = ActiveWatch(lab)
            try:
                fleet = fleet_launch(lab, units, watch)
                single = single_starts(lab, singles, watch)
            finally:
                watch.close()
            assert lab.state is not None
            raw = raw_baseline(lab.node(lab.state.nodes[0].name), singles)
        finally:
            lab.down()
    return {
        "backend": api,
        "units": units,
        "nodes": NODES,
        "lab_up_s": up_s,
        "fleet_all_active_s": fleet["all_active_s"],
        "fleetctl_returned_s": fleet["fleetctl_returned_s"],
        "units_per_node": fleet["per_node"],
        "baseline_systemd_alone_s": baseline["all_active_s"],
        "single_to_active_ms": single["to_active"],
        "single_fleetctl_returned_ms": single["fleetctl_returned"],
        "baseline_raw_start_ms": raw,
        # The machine is shared: how busy it was, for reading the figures.
        "loadavg_1m": round(os.getloadavg()[0], 1),
    }


def run(args: argparse.Namespace) -> dict:
    units = args.units or (6 if args.quick else 60)
    singles = args.singles or (3 if args.quick else 50)
    return {
        "etcd": "3.4, TLS + client certificates + auth, v2 on only for v2",
        "runs": [measure(api, units, singles) for api in BACKENDS],
    }


def render(result: dict) -> str:
    def p50_p95(figures: dict) -> str:
        return f"{figures['p50_ms']:.0f} / {figures['p95_ms']:.0f}"

    rows = [
        {
            "backend": r["backend"],
            f"fleetctl start {r['units']}: all active s": r["fleet_all_active_s"],
            "returned s": r["fleetctl_returned_s"],
            "systemd alone s": r["baseline_systemd_alone_s"],
            "per node": r["units_per_node"],
            "single start -> active ms p50/p95": p50_p95(r["single_to_active_ms"]),
            "fleetctl returned": p50_p95(r["single_fleetctl_returned_ms"]),
            "raw StartUnit": p50_p95(r["baseline_raw_start_ms"]),
            "load": r["loadavg_1m"],
        }
        for r in result["runs"]
    ]
    return f"etcd {result['etcd']}\n" + table(rows)
