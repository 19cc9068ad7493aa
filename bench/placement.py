"""Benchmark: the pure scheduler from 100 to 10,000 machines, fresh and in steady state.

`plan()` runs on every engine wake-up, so its steady-state cost (every unit already placed and
kept) is what a busy cluster pays per event; placing everything from scratch is the baseline,
measured in the same run on the same inputs. A tenth of the units are template instances that
conflict with each other and a tenth are pinned by metadata, so the filters do real work.

The same clusters run again with resources (issue 13): machines with capacity and a load fact,
every unit but the conflicting instances requesting memory and CPU, one in a hundred
constrained on load; once with the default spread strategy and once binpacked. The `requests_*` and `binpack_*`
fields compare with the plain run of the same size, in the same run.
"""

from __future__ import annotations

import argparse
import time

from bench.common import table
from fleetpy.engine.scheduler import plan
from fleetpy.registry import Job, Machine
from fleetpy.unit import load_unit

SIZES = "100x1000,300x3000,1000x10000,3000x30000,10000x100000"
QUICK_SIZES = "10x100,100x1000"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", help=f"MACHINESxUNITS,... (default {SIZES}; --quick {QUICK_SIZES})")
    parser.add_argument("--repeat", type=int, help="best of N runs per size (default 3; --quick 1)")


GIB = 1024**3


def cluster(machines: int, units: int, strategy: str = ""):
    """The benchmark's cluster; with a `strategy`, machines have capacity and facts and every
    unit requests resources."""
    sized = {"capacity": {"cpus": 16.0, "memory": 64.0 * GIB}} if strategy else {}
    nodes = [
        Machine(
            f"{i:032x}",
            f"10.0.{i // 250}.{i % 250}",
            {"role": "db" if i % 10 == 0 else "web"},
            facts={"load1": float(i % 8)} if strategy else {},
            **sized,
        )
        for i in range(machines)
    ]
    texts = {
        0: "[Service]\nExecStart=/bin/true\n[X-Fleet]\nConflicts=web@*.service\n",
        1: "[Service]\nExecStart=/bin/true\n[X-Fleet]\nMachineMetadata=role=db\n",
    }
    jobs = []
    for i in range(units):
        name = {0: f"web@{i}.service", 1: f"db{i}.service"}.get(i % 10, f"app{i}.service")
        text = texts.get(i % 10, "[Service]\nExecStart=/bin/true\n[X-Fleet]\n")
        # The instances that conflict with each other (one per machine) request nothing: beside
        # packed units they would run out of machines with room.
        if strategy and i % 10:
            text += f"Strategy={strategy}\nMemoryRequest={('256M', '512M', '1G')[i % 3]}\nCPURequest=0.5\n"
            if i % 100 == 2:
                text += "MachineConstraint=load1<6\n"
        unit = load_unit(name, text)
        jobs.append((Job(name, unit.hash, "launched"), unit))
    return nodes, jobs


def timed(repeat: int, *args) -> float:
    """Best of `repeat` runs of plan(*args)."""
    return cpu_timed(repeat, *args)[0]


def cpu_timed(repeat: int, *args) -> tuple[float, float]:
    """Best wall time and best CPU time of `repeat` runs of plan(*args). CPU time is this
    process's alone, so a comparison holds on a machine other work keeps busy."""
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeat):
        started, started_cpu = time.perf_counter(), time.process_time()
        plan(*args)
        best = min(best, time.perf_counter() - started)
        best_cpu = min(best_cpu, time.process_time() - started_cpu)
    return best, best_cpu


def run(args: argparse.Namespace) -> dict:
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    repeat = args.repeat or (1 if args.quick else 3)
    rows = []
    for size in sizes.split(","):
        machines, units = map(int, size.split("x"))
        nodes, jobs = cluster(machines, units)
        fresh = plan(nodes, jobs, [])
        fresh_s, fresh_cpu = cpu_timed(repeat, nodes, jobs, [])
        steady_s = timed(repeat, nodes, jobs, fresh.assignments)
        row = {
            "machines": machines,
            "units": units,
            "placed": len(fresh.assignments),
            "pending": len(fresh.pending),
            "fresh_ms": round(fresh_s * 1000, 1),
            "steady_ms": round(steady_s * 1000, 1),
            "steady_over_fresh": round(steady_s / fresh_s, 2),
            "fresh_us_per_unit": round(fresh_s * 1e6 / units, 1),
            "fresh_cpu_ms": round(fresh_cpu * 1000, 1),
        }
        for strategy, label in (("spread", "requests"), ("binpack", "binpack")):
            nodes, jobs = cluster(machines, units, strategy)
            with_requests = plan(nodes, jobs, [])
            requests_s, requests_cpu = cpu_timed(repeat, nodes, jobs, [])
            row[f"{label}_pending"] = len(with_requests.pending)
            row[f"{label}_fresh_ms"] = round(requests_s * 1000, 1)
            row[f"{label}_steady_ms"] = round(timed(repeat, nodes, jobs, with_requests.assignments) * 1000, 1)
            row[f"{label}_fresh_cpu_ms"] = round(requests_cpu * 1000, 1)
            row[f"{label}_cpu_over_plain"] = round(requests_cpu / fresh_cpu, 2)
        rows.append(row)
    return {"rows": rows}


def render(result: dict) -> str:
    return table(result["rows"])
