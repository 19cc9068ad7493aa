"""Benchmark: `fleetctl` as a whole process, against a real API server on a unix socket.

The server (fleetd's API app over the in-memory registry, 3 machines and 60 units) runs in
this process; each command runs as its own process, as a user runs it, N times, and we report
the fastest and the median wall time, and the least CPU time (user + system, from wait4): on a
loaded machine wall time mostly measures the neighbours, CPU time much less. The baseline, in
the same run, is the same interpreter doing nothing (`python -c pass`): the floor of any Python
CLI. The import lines are the floors above it: click (fleetctl's command line), and click with
the standard library's HTTP client.

fleetpy's modules are byte-compiled first, as pip does when it installs a wheel: a checkout run
with PYTHONDONTWRITEBYTECODE=1 (as here) would otherwise compile fleetctl's sources on every run.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import table

PYTHON = sys.executable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, help="runs of each command (default 20; --quick 3)")


def timed(argv: list[str], runs: int) -> dict:
    walls, cpus = [], []
    for _ in range(runs):
        started = time.perf_counter()
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(process.pid, 0)
        walls.append(time.perf_counter() - started)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            raise subprocess.CalledProcessError(process.returncode, argv)
        cpus.append(usage.ru_utime + usage.ru_stime)
    return {
        "min_s": round(min(walls), 3),
        "median_s": round(statistics.median(walls), 3),
        "cpu_min_s": round(min(cpus), 3),
    }


def run(args: argparse.Namespace) -> dict:
    import fleetpy
    from fleetpy.api import create_app, serve
    from fleetpy.registry import Job, Machine, memory_registry
    from fleetpy.unit import UnitFile

    runs = args.runs or (3 if args.quick else 20)
    compileall.compile_dir(Path(fleetpy.__file__).parent, quiet=1)
    registry = memory_registry()

    async def fill() -> None:
        for i in range(3):
            await registry.register_machine(Machine(f"{i:032x}", f"10.0.0.{i + 1}", {"role": "web"}), ttl=600)
        for i in range(60):
            unit_file = UnitFile.parse(f"[Service]\nExecStart=/bin/sleep {1000 + i}\n")
            await registry.submit(unit_file, Job(f"u{i}.service", unit_file.hash, "launched"))

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(fill(), loop).result(10)
    with tempfile.TemporaryDirectory(prefix="fleetpy-bench-cli-") as base:
        sock = str(Path(base) / "fleet.sock")
        app = create_app(registry, machine_id=f"{0:032x}")
        runner = asyncio.run_coroutine_threadsafe(serve(app, socket_path=sock), loop).result(10)
        try:
            fleetctl = [PYTHON, "-m", "fleetpy.cli.fleetctl", "--endpoint", f"unix://{sock}"]
            socket.socket(socket.AF_UNIX).connect(sock)  # it answers before we time anything
            rows = [
                {"what": "baseline: python -c pass", **timed([PYTHON, "-c", "pass"], runs)},
                {"what": "fleetctl list-machines", **timed([*fleetctl, "list-machines"], runs)},
                {"what": "fleetctl list-units (60 units)", **timed([*fleetctl, "list-units"], runs)},
                {"what": "fleetctl --help", **timed([*fleetctl, "--help"], runs)},
                {"what": "python -c 'import click'", **timed([PYTHON, "-c", "import click"], runs)},
                {
                    "what": "python -c 'import click, json, socket'",
                    **timed([PYTHON, "-c", "import click, json, socket"], runs),
                },
                {
                    # What the client spoke HTTP with before, for comparison.
                    "what": "python -c 'import http.client'",
                    **timed([PYTHON, "-c", "import http.client"], runs),
                },
            ]
        finally:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
    floor, cpu_floor = rows[0]["min_s"], rows[0]["cpu_min_s"]
    for row in rows:
        row["over_baseline_s"] = round(row["min_s"] - floor, 3)
        row["cpu_over_baseline_s"] = round(row["cpu_min_s"] - cpu_floor, 3)
    return {"runs": runs, "rows": rows}


def render(result: dict) -> str:
    return table(result["rows"])
