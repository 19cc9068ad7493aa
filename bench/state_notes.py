"""Benchmark: what a unit state write costs the engine leader, now that HealthCheckMoveAfter reads some.

The leader's copy of the registry skips states, but asks the engine's health-move predicate
(fleetpy.engine.health.worth_noting) about each one, and only a state whose restarts reached its
unit's HealthCheckMoveAfter starts a pass. Measured in one run on the same writes: the copy
applying them with the predicate, without it (the baseline: states only skipped), and, for
scale, one steady-state scheduling pass over the same cluster, which is what every state write
would cost if states started passes.
"""

from __future__ import annotations

import argparse
import json
import time

from bench.common import table
from fleetpy.engine.health import worth_noting
from fleetpy.engine.scheduler import plan
from fleetpy.registry import Health, Job, Machine, UnitState
from fleetpy.registry.mirror import Mirror
from fleetpy.registry.store import Change
from fleetpy.unit import UnitFile, load_unit

PREFIX = "/_fleetpy/"
SIZES = "100x1000,1000x10000"
QUICK_SIZES = "10x100"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", help=f"MACHINESxUNITS,... (default {SIZES}; --quick {QUICK_SIZES})")
    parser.add_argument("--writes", type=int, help="state writes per size (default 20000; --quick 2000)")


def cluster(machines: int, units: int):
    """Half the units have a health check that moves them after 3 restarts."""
    checked = UnitFile.parse(
        "[Service]\nExecStart=/bin/sleep 1000\n[X-Fleet]\nHealthCheckTCP=8080\nHealthCheckMoveAfter=3\n"
    )
    plain = UnitFile.parse("[Service]\nExecStart=/bin/sleep 1000\n")
    nodes = [Machine(f"{i:032x}") for i in range(machines)]
    jobs = []
    for i in range(units):
        unit_file = checked if i % 2 else plain
        name = f"u{i}.service"
        jobs.append((Job(name, unit_file.hash, "launched"), load_unit(name, unit_file)))
    return nodes, jobs


def state_writes(jobs, machine_id: str, count: int) -> list[Change]:
    """Mostly healthy states; one in ten unhealthy below the count, one in a thousand at it."""
    changes = []
    for n in range(count):
        job, unit = jobs[n % len(jobs)]
        health = None
        if unit.fleet.health is not None:
            restarts = 3 if n % 1000 == 999 else 1 if n % 10 == 9 else 0
            health = Health("unhealthy" if restarts else "healthy", 1 if restarts else 0, restarts)
        state = UnitState(job.name, machine_id, job.hash, "loaded", "active", "running", "", health)
        key = f"{PREFIX}state/{job.name}/{machine_id}"
        changes.append(Change(n + 1, key, json.dumps(state.to_json())))
    return changes


def engine_note(jobs):
    """The predicate the engine hands its copy (Engine._note_state), over these parsed units."""
    parsed = {(job.name, job.hash): unit for job, unit in jobs}
    state_dir = f"{PREFIX}state/"

    def note(key: str, text: str) -> bool:
        return key.startswith(state_dir) and worth_noting(
            text, lambda name, digest: parsed.get((name, digest))
        )

    return note


def applied(changes: list[Change], note) -> tuple[float, int]:
    """Seconds for the copy to take the writes one by one, as a watch delivers them, and how
    many of them it noted (each would wake the leader for a pass)."""
    mirror = Mirror(None, PREFIX, skip=("state", "events"), note=note)  # type: ignore[arg-type]
    mirror.index = 0
    noted = 0
    started = time.perf_counter()
    for change in changes:
        mirror.apply([change])
        if mirror.take_noted():
            noted += 1
    return time.perf_counter() - started, noted


def run(args: argparse.Namespace) -> dict:
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    writes = args.writes or (2000 if args.quick else 20000)
    rows = []
    for size in sizes.split(","):
        machines, units = map(int, size.split("x"))
        nodes, jobs = cluster(machines, units)
        changes = state_writes(jobs, nodes[0].id, writes)
        baseline_s, _ = applied(changes, None)
        noted_s, noted = applied(changes, engine_note(jobs))
        placed = plan(nodes, jobs, [])
        started = time.perf_counter()
        plan(nodes, jobs, placed.assignments)
        pass_s = time.perf_counter() - started
        rows.append(
            {
                "machines": machines,
                "units": units,
                "writes": writes,
                "writes_noted": noted,
                "skip_only_us": round(baseline_s * 1e6 / writes, 2),
                "with_note_us": round(noted_s * 1e6 / writes, 2),
                "one_pass_ms": round(pass_s * 1000, 1),
            }
        )
    return {"rows": rows}


def render(result: dict) -> str:
    return table(result["rows"])
