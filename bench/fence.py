"""Benchmark: the duplicate window of a partition, with and without self-fencing, on a real lab.

Two nodes with network namespaces, a real etcd and real fleetd. Two units run on the same node:
`fenced.service` ([X-Fleet] Fence=true) and, as the baseline in the same run, `plain.service`
(MachineOf=fenced.service, so it lives and moves with it, unfenced). That node is partitioned
(its link goes down) for --partition seconds, then healed. Each unit writes the host clock
when it starts and when it stops, wherever it runs; the duplicate window of a unit is the time
two copies of it ran at once. Run it as root, under the lab lock:
`flock /work/lab.lock python -m bench fence`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from bench.common import table
from fleetpy.client import Client
from fleetpy.lab.lab import Lab
from fleetpy.unit import UnitFile

UNITS = ("fenced.service", "plain.service")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--partition", type=float, help="seconds the node is cut off (default 35; --quick 8)")
    parser.add_argument("--ttl", type=float, help="agent TTL in seconds (default 10; --quick 3)")


def _unit_text(stem: str, log_dir: Path, extra: str) -> str:
    # %m is the machine id: one log per unit per machine, written with the host's clock.
    log = f"{log_dir}/{stem}-%m"
    return (
        "[Service]\n"
        f"ExecStartPre=/bin/sh -c 'echo start $(date +%%s.%%N) >> {log}'\n"
        "ExecStart=/bin/sleep 100000\n"
        f"ExecStopPost=/bin/sh -c 'echo stop $(date +%%s.%%N) >> {log}'\n"
        f"[X-Fleet]\n{extra}\n"
    )


def _intervals(path: Path, now: float) -> list[tuple[float, float]]:
    """(start, stop) pairs from one log; a copy still running ends `now`."""
    spans, start = [], None
    for line in path.read_text().splitlines():
        what, stamp = line.split()
        if what == "start":
            start = float(stamp)
        elif start is not None:
            spans.append((start, float(stamp)))
            start = None
    if start is not None:
        spans.append((start, now))
    return spans


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(x2, y2) - max(x1, y1)) for x1, x2 in a for y1, y2 in b)


def duplicate_window(log_dir: Path, name: str, now: float) -> float:
    logs = sorted(log_dir.glob(f"{name}-*"))
    spans = [_intervals(p, now) for p in logs]
    return round(
        sum(_overlap(spans[i], spans[j]) for i in range(len(spans)) for j in range(i + 1, len(spans))), 2
    )


def handover_gap(log_dir: Path, name: str, now: float) -> float:
    """Seconds between the first copy's stop and the second copy's start (< 0: both ran)."""
    spans = sorted((_intervals(p, now) for p in log_dir.glob(f"{name}-*")), key=lambda s: s[0][0])
    return round(spans[1][0][0] - spans[0][0][1], 2)


def _where(client: Client, name: str) -> str | None:
    states = [s for s in client.unit_states(unit_name=name) if s["systemdActiveState"] == "active"]
    return states[0]["machineID"] if len(states) == 1 else None


def _wait(what: str, check, timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout:.0f} s")
        time.sleep(0.1)
    return value


def measure(base: Path, partition_s: float, ttl: float) -> dict:
    lab = Lab(base)
    log_dir = base / "unit-logs"
    log_dir.mkdir(parents=True)
    lab.up(node_count=2, network="netns", agent_ttl=f"{ttl:g}s", containers=False)
    client = Client(lab.endpoint())
    try:
        for name, extra in (("fenced.service", "Fence=true"), ("plain.service", "MachineOf=fenced.service")):
            text = _unit_text(name.removesuffix(".service"), log_dir, extra)
            client.create_unit(name, "launched", UnitFile.parse(text).to_options())

        def together() -> str | None:
            where = {_where(client, n) for n in UNITS}
            return where.pop() if len(where) == 1 else None

        first = _wait("both units to run on one node", together, 60)
        cut = next(n.name for n in lab.state.nodes if n.machine_id == first)
        other = next(n for n in lab.state.nodes if n.name != cut)
        client.close()
        client = Client(f"unix://{base / other.name / 'fleet.sock'}")  # the side that stays up
        lab.partition(cut)
        cut_at = time.time()
        time.sleep(partition_s)
        lab.heal(cut)
        healed_at = time.time()
        _wait(
            "both units to run only on the other node",
            lambda: all(_where(client, n) == other.machine_id for n in UNITS) and _single_copies(log_dir),
            120,
        )
        time.sleep(2)
        now = time.time()
        return {
            "partition_s": partition_s,
            "ttl_s": ttl,
            "heal_s_after_cut": round(healed_at - cut_at, 1),
            "rows": [
                {
                    "unit": "plain.service (baseline)",
                    "fence": False,
                    "duplicate_s": duplicate_window(log_dir, "plain", now),
                    "handover_gap_s": handover_gap(log_dir, "plain", now),
                },
                {
                    "unit": "fenced.service",
                    "fence": True,
                    "duplicate_s": duplicate_window(log_dir, "fenced", now),
                    "handover_gap_s": handover_gap(log_dir, "fenced", now),
                },
            ],
        }
    finally:
        client.close()
        lab.down()


def _single_copies(log_dir: Path) -> bool:
    """No unit runs in two places: every log but one ends with a stop."""
    for name in ("fenced", "plain"):
        running = [p for p in log_dir.glob(f"{name}-*") if p.read_text().splitlines()[-1].startswith("start")]
        if len(running) != 1:
            return False
    return True


def run(args: argparse.Namespace) -> dict:
    partition = args.partition or (8.0 if args.quick else 35.0)
    ttl = args.ttl or (3.0 if args.quick else 10.0)
    base = Path(f"/run/fpfence{os.getpid()}")
    try:
        return measure(base, partition, ttl)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def render(result: dict) -> str:
    head = f"partition {result['partition_s']:g} s, agent TTL {result['ttl_s']:g} s"
    return head + "\n" + table(result["rows"])


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m bench.fence", description=__doc__.splitlines()[0])
    cli.add_argument("--quick", action="store_true", help="a short partition that checks the benchmark works")
    cli.add_argument("--json", action="store_true", help="print the result as JSON only")
    add_arguments(cli)
    options = cli.parse_args()
    outcome = run(options)
    print(json.dumps(outcome) if options.json else render(outcome))
