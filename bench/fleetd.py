"""Benchmark: one real fleetd's memory and CPU, idle and with 500 units, on a real user manager.

fleetd runs as in production (its own process, a real systemd --user manager over D-Bus, a
real etcd); CPU is read from /proc/PID/stat, memory is VmRSS. The baseline, in the same run, is
the same Python interpreter doing nothing: what any Python daemon pays before its first import.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import etcd, table
from fleetpy.registry import Job, Registry
from fleetpy.registry.etcd2 import EtcdV2Store
from fleetpy.unit import UnitFile

PREFIX = "/bench-fleetd/"
TICK = os.sysconf("SC_CLK_TCK")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--units", type=int, help="units to run (default 500; --quick 10)")
    parser.add_argument("--idle", type=float, help="seconds of idle CPU sampling (default 20; --quick 2)")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


# fleetd's imports in dependency order; each step's RSS growth is what that step costs.
IMPORT_STEPS = (
    ("python", "pass"),
    ("stdlib: asyncio, logging, json, ssl", "import asyncio, logging, json, ssl"),
    ("click (fleetd's flags)", "import click"),
    ("dbus_next (systemd)", "import dbus_next.aio"),
    ("python-etcd (urllib3, dnspython)", "import etcd"),
    ("tenacity", "import tenacity"),
    ("aiohttp (the API server)", "import aiohttp.web"),
    ("fleetpy's own modules", "import fleetpy.fleetd.main"),
)
_STEPS_SCRIPT = """
import sys
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
for statement in sys.argv[1:]:
    exec(statement)
    print(round(rss(), 1))
"""


def import_costs() -> list[dict]:
    """RSS after each step of fleetd's imports, in one fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", _STEPS_SCRIPT, *(code for _, code in IMPORT_STEPS)],
        capture_output=True,
        text=True,
        check=True,
    )
    totals = [float(line) for line in done.stdout.split()]
    rows, before = [], 0.0
    for (what, _), total in zip(IMPORT_STEPS, totals, strict=True):
        rows.append({"step": what, "rss_mib": total, "adds_mib": round(total - before, 1)})
        before = total
    return rows


def wait_for(what: str, check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout} s")
        time.sleep(0.1)


def measure(url: str, base: Path, units: int, idle: float) -> dict:
    from fleetpy.lab.node import start_node

    node = start_node("bench-fleetd", base, journald=False)
    # This process is synchronous: each registry call runs in an event loop of its own.
    registry = Registry(EtcdV2Store([url]), PREFIX)
    asyncio.run(registry.ensure_schema())
    bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    argv = [
        sys.executable, "-m", "fleetpy.fleetd.main",
        "--etcd-servers", url,
        "--etcd-key-prefix", PREFIX,
        "--unit-dir", str(base / "units"),
        "--api-socket", str(base / "fleet.sock"),
        "--systemd-bus", "user",
    ]  # fmt: skip
    with open(base / "fleetd.log", "ab") as log:
        fleetd = node.popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        started = time.monotonic()
        wait_for("fleetd did not register", lambda: asyncio.run(registry.machines()), 60)
        result = {"start_to_registered_s": round(time.monotonic() - started, 2)}
        time.sleep(1.0)
        before = cpu_s(fleetd.pid)
        time.sleep(idle)
        result["idle"] = {
            "rss_mib": rss_mib(fleetd.pid),
            "cpu_pct": round(100 * (cpu_s(fleetd.pid) - before) / idle, 2),
        }
        result["baseline_bare_python_rss_mib"] = rss_mib(bare.pid)

        before, started = cpu_s(fleetd.pid), time.monotonic()
        for i in range(units):
            unit_file = UnitFile.parse(f"[Service]\nExecStart=/bin/sleep {100000 + i}\n")
            job = Job(f"bench{i}.service", unit_file.hash, "launched")
            asyncio.run(registry.submit(unit_file, job))

        def all_active() -> bool:
            return sum(s.active_state == "active" for s in asyncio.run(registry.states())) >= units

        wait_for(f"{units} units were not all active", all_active, 300)
        took = time.monotonic() - started
        result["launch"] = {
            "units": units,
            "all_active_s": round(took, 2),
            "fleetd_cpu_s": round(cpu_s(fleetd.pid) - before, 2),
            "rss_mib": rss_mib(fleetd.pid),
        }
        time.sleep(1.0)
        before = cpu_s(fleetd.pid)
        time.sleep(idle)
        result["idle_with_units"] = {
            "units": units,
            "rss_mib": rss_mib(fleetd.pid),
            "cpu_pct": round(100 * (cpu_s(fleetd.pid) - before) / idle, 2),
        }
        return result
    finally:
        fleetd.terminate()
        try:
            fleetd.wait(timeout=10)
        except subprocess.TimeoutExpired:
            fleetd.kill()
        bare.kill()
        bare.wait()
        node.kill()


def run(args: argparse.Namespace) -> dict:
    units = args.units or (10 if args.quick else 500)
    idle = args.idle or (2.0 if args.quick else 20.0)
    with etcd() as url, tempfile.TemporaryDirectory(prefix="fb-") as base:
        result = measure(url, Path(base), units, idle)
    result["imports"] = import_costs()
    return result


def render(result: dict) -> str:
    idle, launch, busy = result["idle"], result["launch"], result["idle_with_units"]
    return "\n".join(
        [
            f"fleetd idle:            {idle['rss_mib']} MiB RSS, {idle['cpu_pct']}% CPU "
            f"(bare python: {result['baseline_bare_python_rss_mib']} MiB)",
            f"launching {launch['units']} units: all active in {launch['all_active_s']} s, "
            f"{launch['fleetd_cpu_s']} s fleetd CPU, {launch['rss_mib']} MiB RSS",
            f"idle with {busy['units']} units: {busy['rss_mib']} MiB RSS, {busy['cpu_pct']}% CPU",
            "where an idle fleetd's memory goes (RSS after each import step, one fresh interpreter):",
            table(result["imports"]),
        ]
    )
