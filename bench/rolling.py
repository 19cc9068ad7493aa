"""Benchmark: `fleetctl rolling-replace` of 5 instances at --max-unavailable 1 and 2, on a real lab.

A 3-node lab (real etcd, systemd --user managers, fleetds, each node in its own network
namespace, so an instance's port and health check are its node's own, as on real machines) runs 5
instances of an HTTP server template with an HTTP health check every 2 s (tests/test_rolling_lab.py
uses the same unit). Each run replaces all 5 with new content once at --max-unavailable 1 and once
at 2 (in alternating order, so neither always goes first on a machine that warms up), timing
fleetctl from start to exit while a sampler counts healthy instances every 0.2 s. The baseline, in
the same run, is starting all 5 at once (fresh) until every one is healthy: the least any
replacement can take, since each batch waits for the same health check to pass.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import table
from fleetpy.client import Client
from fleetpy.lab.lab import Lab

NODES = 3
TEMPLATE = "bench@.service"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runs", type=int, help="runs, each one baseline and both batch sizes (default 3; --quick 1)"
    )
    parser.add_argument("--instances", type=int, default=5, help="instances replaced (default 5)")


def unit_text(version: int) -> str:
    return (
        "[Service]\n"
        f"Environment=VERSION={version}\n"
        "ExecStart=/usr/bin/python3 -m http.server 82%i --bind 127.0.0.1 --directory /\n"
        "[X-Fleet]\n"
        "HealthCheckHTTP=http://127.0.0.1:82%i/\n"
        "HealthCheckInterval=2s\nHealthCheckTimeout=2s\nHealthCheckThreshold=3\nHealthCheckStartPeriod=5s\n"
    )


def fleetctl(lab: Lab, *args: str) -> str:
    env = {**os.environ, "FLEETCTL_ENDPOINT": lab.endpoint()}
    argv = [sys.executable, "-m", "fleetpy.cli.fleetctl", *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"fleetctl {' '.join(args)} failed: {result.stdout}{result.stderr}")
    return result.stdout


class Sampler:
    """Healthy instances every 0.2 s, in a thread, while a replacement runs."""

    def __init__(self, client: Client):
        self.client = client
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def healthy(self) -> int:
        return sum(
            1
            for s in self.client.unit_states()
            if s["name"].startswith("bench@") and (s.get("health") or {}).get("status") == "healthy"
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.healthy())
            time.sleep(0.2)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def until_healthy(sampler: Sampler, instances: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while sampler.healthy() < instances:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{instances} instances not healthy after {timeout} s")
        time.sleep(0.1)


def start_all(lab: Lab, work: Path, sampler: Sampler, instances: int) -> float:
    """Seconds from `fleetctl start` of every instance (none running) until all are healthy."""
    names = [f"bench@{i}.service" for i in range(1, instances + 1)]
    started = time.monotonic()
    fleetctl(lab, "start", *(str(work / name) for name in names))
    until_healthy(sampler, instances)
    return time.monotonic() - started


def replace(lab: Lab, work: Path, sampler: Sampler, version: int, batch: int) -> tuple[float, int]:
    """Seconds the rolling replace took (fleetctl start to exit), and the fewest healthy meanwhile."""
    (work / TEMPLATE).write_text(unit_text(version))
    with Sampler(sampler.client) as during:
        started = time.monotonic()
        fleetctl(lab, "rolling-replace", str(work / TEMPLATE), "--max-unavailable", str(batch))
        took = time.monotonic() - started
    return took, min(during.samples)


def run(args: argparse.Namespace) -> dict:
    runs = args.runs or (1 if args.quick else 3)
    instances = args.instances
    rows = []
    with tempfile.TemporaryDirectory(prefix="fbr-") as base:
        lab = Lab(Path(base) / "lab")
        work = Path(base) / "units"
        work.mkdir()
        os.chmod(base, 0o755)
        try:
            lab.up(node_count=NODES, network="netns", agent_ttl="5s", containers=False)
            client = Client(lab.endpoint(), timeout=30)
            sampler = Sampler(client)
            version = 1
            for number in range(runs):
                (work / TEMPLATE).write_text(unit_text(version))
                baseline = start_all(lab, work, sampler, instances)
                row = {"run": number + 1, "start_all_healthy_s": round(baseline, 2)}
                for batch in (1, 2) if number % 2 == 0 else (2, 1):
                    version += 1
                    took, fewest = replace(lab, work, sampler, version, batch)
                    row[f"max_unavailable_{batch}_s"] = round(took, 2)
                    row[f"max_unavailable_{batch}_fewest_healthy"] = fewest
                row["loadavg_1m"] = round(os.getloadavg()[0], 1)
                rows.append(row)
                fleetctl(lab, "destroy", *(f"bench@{i}.service" for i in range(1, instances + 1)))
                fleetctl(lab, "destroy", TEMPLATE)
                version += 1
            client.close()
        finally:
            lab.down()

    def median(key: str) -> float:
        return round(statistics.median(row[key] for row in rows), 2)

    return {
        "instances": instances,
        "nodes": NODES,
        "health_check": "HTTP every 2 s, first 1 s after start",
        "runs": rows,
        "median_s": {
            "start_all_healthy": median("start_all_healthy_s"),
            "max_unavailable_1": median("max_unavailable_1_s"),
            "max_unavailable_2": median("max_unavailable_2_s"),
        },
    }


def render(result: dict) -> str:
    return (
        f"{result['instances']} instances on {result['nodes']} nodes; medians {result['median_s']}\n"
        + table(result["runs"])
    )
