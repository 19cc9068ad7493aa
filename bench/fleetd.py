"""Benchmark: one real fleetd's memory and CPU, idle and with 500 units, on a real user manager.

fleetd runs as in production (its own process, a real systemd --user manager over D-Bus, a
real etcd), once on each etcd API (v3, the default, through aetcd and gRPC; v2 through
python-etcd), each finding its registry already there as a restarted fleetd does; CPU is read
from /proc/PID/stat, memory is VmRSS. The baseline, in the same run, is the same Python
interpreter doing nothing: what any Python daemon pays before its first import.

Where the memory goes: fleetd's imports step by step in one fresh interpreter per backend, each
step's RSS growth, and the part of it that is Python objects (tracemalloc, in a second
interpreter: the rest is native code and data of C extensions and the libraries they load).
fleetpy's modules are byte-compiled first, as pip does when it installs a wheel.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fleetpy
from bench.common import etcd, table
from fleetpy.registry import EtcdOptions, Job, Registry, open_store
from fleetpy.unit import UnitFile

PREFIX = "/bench-fleetd/"
TICK = os.sysconf("SC_CLK_TCK")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--units", type=int, help="units to run (default 500; --quick 10)")
    parser.add_argument("--idle", type=float, help="seconds of idle CPU sampling (default 20; --quick 2)")
    parser.add_argument(
        "--api", choices=("v3", "v2", "both"), default="both", help="etcd API fleetd speaks (default both)"
    )


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


# fleetd's imports in dependency order; each step's RSS growth is what that step costs.
COMMON_STEPS = (
    ("python", "pass"),
    ("stdlib: asyncio (which imports ssl), logging, json", "import asyncio, logging, json"),
    ("click (fleetd's flags)", "import click"),
    ("dbus_next (systemd)", "import dbus_next.aio"),
)
BACKEND_STEPS = {
    "v3": ("aetcd, grpc (etcd v3)", "import fleetpy.registry.etcd3"),
    "v2": ("python-etcd, urllib3, tenacity (etcd v2)", "import fleetpy.registry.etcd2"),
}
LATER_STEPS = (
    ("aiohttp (the API server)", "import aiohttp.web"),
    ("fleetpy's own modules", "import fleetpy.fleetd.main"),
)
_STEPS_SCRIPT = """
import sys
if sys.argv[1] == "traced":
    import tracemalloc
    tracemalloc.start()
    measure = lambda: tracemalloc.get_traced_memory()[0] / 2**20
else:
    def measure():
        for line in open('/proc/self/status'):
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
for statement in sys.argv[2:]:
    exec(statement)
    print(round(measure(), 2))
"""


def import_costs(api: str) -> list[dict]:
    """RSS (and Python objects' share of it) after each step of fleetd's imports on `api`."""
    steps = (*COMMON_STEPS, BACKEND_STEPS[api], *LATER_STEPS)
    totals = {}
    for how in ("rss", "traced"):
        done = subprocess.run(
            [sys.executable, "-c", _STEPS_SCRIPT, how, *(code for _, code in steps)],
            capture_output=True,
            text=True,
            check=True,
        )
        totals[how] = [float(line) for line in done.stdout.split()]
    rows, before = [], (0.0, 0.0)
    for (what, _), rss, traced in zip(steps, totals["rss"], totals["traced"], strict=True):
        rows.append(
            {
                "step": what,
                "rss_mib": round(rss, 1),
                "adds_mib": round(rss - before[0], 1),
                "python_objects_mib": round(traced - before[1], 1),
            }
        )
        before = (rss, traced)
    return rows


def wait_for(what: str, check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout} s")
        time.sleep(0.1)


def measure(url: str, api: str, base: Path, units: int, idle: float) -> dict:
    from fleetpy.lab.node import start_node

    node = start_node(f"bench-fleetd-{api}", base, journald=False)
    prefix = f"{PREFIX}{api}/"

    def call(method: str, *args):
        """One registry call in an event loop of its own (this process is synchronous)."""

        async def once():
            registry = Registry(open_store(EtcdOptions((url,)), api), prefix)
            try:
                return await getattr(registry, method)(*args)
            finally:
                await registry.close()

        return asyncio.run(once())

    call("ensure_schema")
    bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    argv = [
        sys.executable, "-m", "fleetpy.fleetd.main",
        "--etcd-servers", url,
        "--etcd-key-prefix", prefix,
        # v3 is what fleetd chooses by itself (auto); a v2 cluster names its API.
        "--etcd-api", "auto" if api == "v3" else "v2",
        "--unit-dir", str(base / "units"),
        "--api-socket", str(base / "fleet.sock"),
        "--systemd-bus", "user",
    ]  # fmt: skip
    with open(base / "fleetd.log", "ab") as log:
        fleetd = node.popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        started = time.monotonic()
        wait_for("fleetd did not register", lambda: call("machines"), 60)
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
            call("submit", unit_file, job)

        def all_active() -> bool:
            return sum(s.active_state == "active" for s in call("states")) >= units

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
    apis = ("v3", "v2") if args.api == "both" else (args.api,)
    compileall.compile_dir(Path(fleetpy.__file__).parent, quiet=1)
    result: dict = {"apis": {}}
    with etcd() as url:
        for api in apis:
            with tempfile.TemporaryDirectory(prefix="fb-") as base:
                result["apis"][api] = measure(url, api, Path(base), units, idle)
            result["apis"][api]["imports"] = import_costs(api)
    return result


def render(result: dict) -> str:
    lines = []
    for api, one in result["apis"].items():
        idle, launch, busy = one["idle"], one["launch"], one["idle_with_units"]
        lines += [
            f"== fleetd on etcd {api}",
            f"fleetd idle:            {idle['rss_mib']} MiB RSS, {idle['cpu_pct']}% CPU "
            f"(bare python: {one['baseline_bare_python_rss_mib']} MiB)",
            f"launching {launch['units']} units: all active in {launch['all_active_s']} s, "
            f"{launch['fleetd_cpu_s']} s fleetd CPU, {launch['rss_mib']} MiB RSS",
            f"idle with {busy['units']} units: {busy['rss_mib']} MiB RSS, {busy['cpu_pct']}% CPU",
            "where an idle fleetd's memory goes (after each import step, one fresh interpreter):",
            table(one["imports"]),
        ]
    return "\n".join(lines)
