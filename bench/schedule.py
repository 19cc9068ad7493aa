"""Benchmark: the pure scheduler, from a fresh cluster and in steady state.

`plan()` runs on every engine wake-up, so its steady-state cost (every unit already placed and
kept) is what a busy cluster pays per event; placing everything from scratch is the baseline,
measured in the same run on the same inputs. A tenth of the units are templates instances with
Conflicts and a tenth are pinned by metadata, so the filters do real work.
"""

from __future__ import annotations

import argparse
import json
import time

from fleetpy.engine.scheduler import plan
from fleetpy.registry import Job, Machine
from fleetpy.unit import load_unit


def cluster(machines: int, units: int):
    nodes = [
        Machine(f"{i:032x}", f"10.0.{i // 250}.{i % 250}", {"role": "db" if i % 10 == 0 else "web"})
        for i in range(machines)
    ]
    jobs = []
    for i in range(units):
        if i % 10 == 0:
            name, text = (
                f"web@{i}.service",
                "[Service]\nExecStart=/bin/true\n[X-Fleet]\nConflicts=web@*.service\n",
            )
        elif i % 10 == 1:
            name, text = (
                f"db{i}.service",
                "[Service]\nExecStart=/bin/true\n[X-Fleet]\nMachineMetadata=role=db\n",
            )
        else:
            name, text = f"app{i}.service", "[Service]\nExecStart=/bin/true\n"
        unit = load_unit(name, text)
        jobs.append((Job(name, unit.hash, "launched"), unit))
    return nodes, jobs


def timed(repeat: int, *args) -> float:
    """Best of `repeat` runs of plan(*args)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        plan(*args)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10x100,100x1000,300x3000", help="MACHINESxUNITS,...")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = []
    for size in args.sizes.split(","):
        machines, units = map(int, size.split("x"))
        nodes, jobs = cluster(machines, units)
        fresh = plan(nodes, jobs, [])
        fresh_s = timed(args.repeat, nodes, jobs, [])
        steady_s = timed(args.repeat, nodes, jobs, fresh.assignments)
        results.append(
            {
                "machines": machines,
                "units": units,
                "placed": len(fresh.assignments),
                "pending": len(fresh.pending),
                "fresh_ms": round(fresh_s * 1000, 1),
                "steady_ms": round(steady_s * 1000, 1),
                "steady_over_fresh": round(steady_s / fresh_s, 2),
            }
        )
    if not args.json:
        for r in results:
            print(
                f"{r['machines']:>5} machines {r['units']:>6} units: fresh {r['fresh_ms']:>8} ms, "
                f"steady {r['steady_ms']:>8} ms ({r['steady_over_fresh']}x), "
                f"{r['placed']} placed, {r['pending']} pending"
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
