"""Benchmark: `fleetctl volume move` of a local volume between two nodes of a real lab, by size.

A 4-node lab (real etcd, systemd --user managers, fleetds in their own network namespaces) runs
one unit with a local volume. It moves between two nodes that do not hold the engine's lease;
a fourth node, a bystander in no move and not the leader, shows what the moves cost the rest of
the cluster: the etcd requests its fleetd made meanwhile (from its /metrics, heartbeats
included), and those of its agent following volume moves. For each size the volume is filled with that many MB (half in 4 MB
files, half in 64 KiB files), then moved to the other node and back, timing fleetctl from start
to exit (its units stopped, the data streamed from one fleetd to the other as a checked tar, put
in place, the unit started there). The baseline, in the same run, is copying the same directory
on the same disk with shutil.copytree: what any copy costs without the network, the checks or
the scheduling. The copies the moves set aside are removed between sizes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench.common import table
from fleetpy.client import Client
from fleetpy.lab.lab import Lab
from fleetpy.lab.metrics import scrape

UNIT = "[Service]\nExecStart=/bin/sleep 100000\n[X-Fleet]\nVolume=benchvol\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", help="comma-separated volume sizes in MB (default 1,50,200; --quick 1)")


def fleetctl(lab: Lab, *args: str) -> str:
    env = {**os.environ, "FLEETCTL_ENDPOINT": lab.endpoint()}
    argv = [sys.executable, "-m", "fleetpy.cli.fleetctl", *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"fleetctl {' '.join(args)} failed: {result.stdout}{result.stderr}")
    return result.stdout


def fill(volume: Path, megabytes: int) -> int:
    """Write `megabytes` MB of random data into `volume`: half in 4 MB files, half in 64 KiB ones."""
    half = megabytes * (1 << 20) // 2
    (volume / "small").mkdir(exist_ok=True)
    written = 0
    for index in range(max(1, half // (4 << 20))):
        (volume / f"big-{index}").write_bytes(os.urandom(min(4 << 20, half)))
        written += min(4 << 20, half)
    for index in range(max(1, half // (64 << 10))):
        (volume / "small" / f"s-{index}").write_bytes(os.urandom(64 << 10))
        written += 64 << 10
    return written


def volume_dir(lab: Lab, node: str) -> Path:
    return lab.book.dir / node / "volumes"


def where(client: Client, lab: Lab) -> str | None:
    assert lab.state is not None
    by_id = {n.machine_id: n.name for n in lab.state.nodes}
    states = [
        s for s in client.unit_states(unit_name="bench-db.service") if s["systemdActiveState"] == "active"
    ]
    return by_id.get(states[0]["machineID"]) if states else None


def until_on(client: Client, lab: Lab, node: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while where(client, lab) != node:
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench-db.service did not run on {node} within {timeout}s")
        time.sleep(0.1)


def etcd_requests(lab: Lab, node: str) -> dict[str, float]:
    """The etcd requests `node`'s fleetd has made so far, by the registry call they served."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(scrape(lab.book)):
        for sample in family.samples:
            if sample.name == "fleetpy_etcd_request_seconds_count" and sample.labels["node"] == node:
                call = sample.labels["call"]
                found[call] = found.get(call, 0.0) + sample.value
    return found


# The registry calls with which an agent follows volume moves (old and new key layouts).
FOLLOWING_MOVES = ("volume_records", "volume_doorbells", "volume_records_of")


def move(lab: Lab, client: Client, node: str) -> float:
    assert lab.state is not None
    began = time.monotonic()
    fleetctl(lab, "volume", "move", "benchvol", lab.state.node(node).machine_id)
    took = time.monotonic() - began
    until_on(client, lab, node)
    return took


def run(args: argparse.Namespace) -> dict:
    sizes = [int(s) for s in (args.sizes or ("1" if args.quick else "1,50,200")).split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fbv-") as base:
        lab = Lab(Path(base) / "lab")
        work = Path(base) / "units"
        work.mkdir()
        os.chmod(base, 0o755)
        try:
            lab.up(node_count=4, network="netns", agent_ttl="5s", containers=False)
            client = Client(lab.endpoint(), timeout=30)
            (work / "bench-db.service").write_text(UNIT)
            fleetctl(lab, "start", "--no-block", str(work / "bench-db.service"))
            deadline = time.monotonic() + 120
            while (home := where(client, lab)) is None:
                if time.monotonic() > deadline:
                    raise RuntimeError("bench-db.service did not start")
                time.sleep(0.1)
            assert lab.state is not None
            by_id = {n.machine_id: n.name for n in lab.state.nodes}
            leader = by_id.get(lab.leader() or "")
            other, bystander = [n.name for n in lab.state.nodes if n.name not in (home, leader)][:2]
            for megabytes in sizes:
                written = fill(volume_dir(lab, home) / "benchvol", megabytes)
                began = time.monotonic()
                shutil.copytree(volume_dir(lab, home) / "benchvol", Path(base) / "copy")
                copytree = time.monotonic() - began
                shutil.rmtree(Path(base) / "copy")
                before = etcd_requests(lab, bystander)
                there, back = move(lab, client, other), move(lab, client, home)
                after = etcd_requests(lab, bystander)
                spent = {call: after.get(call, 0.0) - before.get(call, 0.0) for call in after}
                for node in (home, other):
                    for aside in volume_dir(lab, node).glob("benchvol~*"):
                        shutil.rmtree(aside)
                rows.append(
                    {
                        "mb": round(written / (1 << 20), 1),
                        "files": sum(1 for _ in (volume_dir(lab, home) / "benchvol").rglob("*")),
                        "move_there_s": round(there, 2),
                        "move_back_s": round(back, 2),
                        "copytree_s": round(copytree, 2),
                        "move_mb_per_s": round(written / (1 << 20) / statistics.mean((there, back)), 1),
                        "bystander_etcd_requests": int(sum(spent.values())),
                        "bystander_following_moves": int(sum(spent.get(c, 0.0) for c in FOLLOWING_MOVES)),
                        "loadavg_1m": round(os.getloadavg()[0], 1),
                    }
                )
            fleetctl(lab, "destroy", "bench-db.service")
            client.close()
        finally:
            lab.down()
    return {"nodes": 4, "rows": rows}


def render(result: dict) -> str:
    return (
        f"volume moves between 2 of {result['nodes']} lab nodes (baseline: shutil.copytree on one disk; "
        "bystander: a node in no move, not the leader, its etcd requests during both moves)\n"
        + table(result["rows"])
    )
