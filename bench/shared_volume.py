"""Benchmark: a node killed under a unit on a shared volume, until the unit answers elsewhere with its old data.

A 3-node lab (real etcd, systemd --user managers, fleetds, each node in its own network namespace)
whose nodes all get one host directory as their shared volume directory, as machines mounting
the same NFS would. A database in miniature (python3: at each start it appends a record to the
file in its volume, then serves the records over HTTP on its node's address) runs with
`Volume=db:shared`. Each round kills the node it runs on (`lab kill-node`: every process at once,
and its network) and times until the unit answers on another node with every record it had and
the new one. The baseline, in the same run and the same lab, is the same server with no volume:
its node killed, until it answers on another node at all. Both wait for the machine's TTL to
expire first: that is the floor. Rounds alternate which one goes first, and the killed node is
booted again before the next.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import table
from fleetpy.client import Client
from fleetpy.lab.lab import Lab

NODES = 3
PORT = 8090
SERVER = """\
import http.server, os, sys
os.makedirs(sys.argv[1], exist_ok=True)
path = os.path.join(sys.argv[1], "records")
count = sum(1 for _ in open(path)) if os.path.exists(path) else 0
with open(path, "a") as f:
    f.write(f"start {count + 1}\\n")
    f.flush()
    os.fsync(f.fileno())
class Records(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = open(path, "rb").read()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer(("", int(sys.argv[2])), Records).serve_forever()
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ttls", default="2,5", help="agent TTLs in seconds, one lab each (default 2,5)")
    parser.add_argument("--rounds", type=int, help="node kills per unit and TTL (default 3; --quick 1)")


def fleetctl(lab: Lab, *args: str, node: str = "node1") -> str:
    env = {**os.environ, "FLEETCTL_ENDPOINT": f"unix://{lab.dir / node / 'fleet.sock'}"}
    argv = [sys.executable, "-m", "fleetpy.cli.fleetctl", *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"fleetctl {' '.join(args)} failed: {result.stdout}{result.stderr}")
    return result.stdout


def records(ip: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://{ip}:{PORT}/", timeout=1) as response:
            return response.read().decode()
    except OSError:
        return None


def wait(what: str, predicate, timeout: float = 120.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout} s")
        time.sleep(interval)
    return value


def running_on(lab: Lab, client: Client, unit: str) -> str | None:
    """The node the unit is active on, by its published state."""
    assert lab.state is not None
    by_id = {n.machine_id: n.name for n in lab.state.nodes}
    active = [
        s["machineID"]
        for s in client.unit_states(unit_name=unit)
        if s.get("systemdActiveState") == "active" and s["machineID"] in lab.machines()
    ]
    return by_id.get(active[0]) if len(active) == 1 else None


def kill_and_time(lab: Lab, client: Client, unit: str, keeps_data: bool) -> dict:
    """Kill the node running `unit`; seconds until it answers on another node (when it
    `keeps_data`: with its old records and a new one)."""
    assert lab.state is not None
    home = wait(f"{unit} running", lambda: running_on(lab, client, unit))
    home_ip = lab.state.node(home).ip
    before = wait(f"{unit} answering", lambda: records(home_ip))
    others = [n.ip for n in lab.state.nodes if n.name != home]
    leader_killed = lab.leader() == lab.state.node(home).machine_id
    expect = before + f"start {before.count(chr(10)) + 1}\n"
    killed = time.monotonic()
    lab.kill_node(home)

    def answer() -> str | None:
        for ip in others:
            found = records(ip)
            if found and (not keeps_data or found == expect):
                return found
        return None

    try:
        wait(f"{unit} answering on another node", answer, interval=0.02)
    except TimeoutError as error:
        alive = next(n.name for n in lab.state.nodes if n.name != home)
        answers = {ip: records(ip) for ip in others}
        logs = {n.name: (lab.dir / n.name / "fleetd.log").read_text()[-3000:] for n in lab.state.nodes}
        raise TimeoutError(
            f"{error}; expected {expect!r}, got {answers}\n{fleetctl(lab, 'list-units', node=alive)}\n{logs}"
        ) from None
    took = time.monotonic() - killed
    lab.restart_node(home)
    wait(f"{home} registered again", lambda: lab.state.node(home).machine_id in lab.machines())
    return {"seconds": round(took, 2), "leader_killed": leader_killed, "records_before": before.count("\n")}


def one_lab(ttl: float, rounds: int, base: Path) -> list[dict]:
    lab = Lab(base / f"lab-ttl{ttl:g}")
    work = base / "units"
    work.mkdir(exist_ok=True)
    (work / "server.py").write_text(SERVER)
    # Its data on the shared volume; the baseline's in the node's own runtime directory.
    (work / "shared.service").write_text(
        f"[Service]\nExecStart=/usr/bin/python3 {work / 'server.py'} ${{FLEET_VOLUME_db}} {PORT}\n"
        "[X-Fleet]\nVolume=db:shared\n"
    )
    (work / "stateless.service").write_text(
        f"[Service]\nRuntimeDirectory=stateless\n"
        f"ExecStart=/usr/bin/python3 {work / 'server.py'} ${{RUNTIME_DIRECTORY}} {PORT}\n"
    )
    rows = []
    try:
        lab.up(node_count=NODES, network="netns", agent_ttl=f"{ttl:g}s", containers=False)
        client = Client(lab.endpoint(), timeout=30)
        for number in range(rounds):
            order = ("shared", "stateless") if number % 2 == 0 else ("stateless", "shared")
            row: dict = {"ttl_s": ttl, "round": number + 1}
            for kind in order:
                fleetctl(lab, "start", str(work / f"{kind}.service"))
                found = kill_and_time(lab, client, f"{kind}.service", keeps_data=kind == "shared")
                row[f"{kind}_s"] = found["seconds"]
                row[f"{kind}_leader_killed"] = found["leader_killed"]
                if kind == "shared":
                    row["shared_records_kept"] = found["records_before"]
                # Stopped, so the other one can take the port; started again where it fits.
                fleetctl(lab, "stop", f"{kind}.service")
            row["loadavg_1m"] = round(os.getloadavg()[0], 1)
            rows.append(row)
        client.close()
    finally:
        lab.down()
    return rows


def run(args: argparse.Namespace) -> dict:
    ttls = [float(t) for t in args.ttls.split(",")]
    rounds = args.rounds or (1 if args.quick else 3)
    if args.quick:
        ttls = [min(ttls)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fbs-") as base:
        os.chmod(base, 0o755)
        for ttl in ttls:
            rows += one_lab(ttl, rounds, Path(base))

    def median(ttl: float, key: str) -> float:
        return round(statistics.median(r[key] for r in rows if r["ttl_s"] == ttl), 2)

    return {
        "nodes": NODES,
        "unit": "python3 HTTP server appending a record to its volume at each start",
        "rounds": rows,
        "median_s": {
            f"ttl_{ttl:g}s": {
                "shared_volume": median(ttl, "shared_s"),
                "stateless": median(ttl, "stateless_s"),
            }
            for ttl in ttls
        },
    }


def render(result: dict) -> str:
    return (
        f"node kill -> unit answering on another node ({result['nodes']} nodes); medians "
        f"{result['median_s']}\n" + table(result["rounds"])
    )
