"""Benchmark: 60 units started on a real 3-node lab, on each etcd backend (v2, v3), in one run.

For each backend a fresh lab (`fleetpy lab up --etcd-api v2|v3`: real etcd 3.4 with TLS, client
certificates and auth, three real systemd --user managers, three fleetds) runs on loopback
addresses. All units are submitted in one pipelined API request batch (what `fleetctl start`
does); the time runs until every one is active in its node's systemd, as the agents publish it.
The baseline, in the same run, is systemd alone: the same unit files started straight in the
same three managers (one `systemctl --user start` per node, in parallel), with no fleet at all.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.common import table
from fleetpy.client import Client
from fleetpy.lab.lab import Lab
from fleetpy.unit import UnitFile

BACKENDS = ("v2", "v3")
NODES = 3
UNIT = "[Service]\nExecStart=/bin/sleep {n}\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--units", type=int, help="units to start (default 60; --quick 6)")


def wait_for(what: str, check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout} s")
        time.sleep(0.05)


def fleet_launch(lab: Lab, units: int) -> dict:
    """Submit `units` launched units through the API; seconds until all are active."""
    client = Client(lab.endpoint(), timeout=60)
    names = [f"b{i}.service" for i in range(units)]
    options = {
        n: [{"section": "Service", "name": "ExecStart", "value": f"/bin/sleep {100000 + i}"}]
        for i, n in enumerate(names)
    }
    started = time.monotonic()
    answers = client.pipeline(
        ("PUT", f"/fleet/v1/units/{n}", None, {"desiredState": "launched", "options": options[n]})
        for n in names
    )
    refused = [a.text for a in answers if a.status_code >= 300]
    assert not refused, refused[:3]

    def active() -> list[dict]:
        return [s for s in client.unit_states() if s["systemdActiveState"] == "active"]

    wait_for(f"{units} units active", lambda: len(active()) >= units, 300)
    took = time.monotonic() - started
    by_machine = Counter(s["machineID"] for s in active())
    client.close()
    return {"all_active_s": round(took, 2), "per_node": sorted(by_machine.values(), reverse=True)}


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


def measure(api: str, units: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="fbl-") as base:
        lab = Lab(Path(base))
        started = time.monotonic()
        try:
            lab.up(node_count=NODES, network="loopback", agent_ttl="10s", containers=False, etcd_api=api)
            up_s = round(time.monotonic() - started, 2)
            baseline = systemd_launch(lab, units)
            fleet = fleet_launch(lab, units)
        finally:
            lab.down()
    return {
        "backend": api,
        "units": units,
        "nodes": NODES,
        "lab_up_s": up_s,
        "fleet_all_active_s": fleet["all_active_s"],
        "units_per_node": fleet["per_node"],
        "baseline_systemd_alone_s": baseline["all_active_s"],
        # The machine is shared: how busy it was, for reading the figures.
        "loadavg_1m": round(os.getloadavg()[0], 1),
    }


def run(args: argparse.Namespace) -> dict:
    units = args.units or (6 if args.quick else 60)
    return {
        "etcd": "3.4, TLS + client certificates + auth, v2 on only for v2",
        "runs": [measure(api, units) for api in BACKENDS],
    }


def render(result: dict) -> str:
    return f"etcd {result['etcd']}\n" + table(result["runs"])
