"""Benchmark: start latency (StartUnit -> active) of a podman container unit vs a plain sleep unit.

Both run in the same lab node in the same run, alternating, so host noise hits both alike.
StartUnit goes over D-Bus exactly as fleetd's agent sends it, and the job ends when the unit
is active (Type=notify: once conmon reports READY=1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from fleetpy.containers.generate import generate_unit
from fleetpy.lab.image import DEFAULT_IMAGE, build_busybox_image, prepare_node, write_podman_config
from fleetpy.lab.node import start_node
from fleetpy.systemd import SystemdBus

SLEEP_UNIT = "[Service]\nExecStart=/bin/sleep 3600\n"


async def _start_stop(manager: SystemdBus, unit: str) -> float:
    started = time.monotonic()
    result = await manager.run_job("StartUnit", unit)
    elapsed = time.monotonic() - started
    if result != "done" or (await manager.unit_state(unit))[1] != "active":
        raise RuntimeError(f"{unit} is not active after its start job ({result})")
    await manager.run_job("StopUnit", unit)
    return elapsed


async def _measure(bus: str, n: int) -> tuple[list[float], list[float]]:
    manager = await SystemdBus.connect(bus)
    try:
        container: list[float] = []
        sleep: list[float] = []
        for _ in range(n):
            container.append(await _start_stop(manager, "web@bench.service"))
            sleep.append(await _start_stop(manager, "sleeper.service"))
        return container, sleep
    finally:
        await manager.close()


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    # Nearest-rank percentiles: with N=10 an interpolated p95 would invent a value.
    p95 = ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]
    return {"p50_ms": statistics.median(ordered) * 1000, "p95_ms": p95 * 1000, "n": len(ordered)}


def run(n: int) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="fpbench-") as base:
        podman_env = write_podman_config(Path(base) / "podman")
        build_busybox_image(DEFAULT_IMAGE, podman_env)
        node = start_node("bench", Path(base))
        try:
            prepare_node(node, podman_env)
            unit_dir = node.dir / "home" / ".config" / "systemd" / "user"
            unit_dir.mkdir(parents=True)
            (unit_dir / "web@.service").write_text(
                generate_unit(
                    "web@.service", DEFAULT_IMAGE, network="none", command=["httpd", "-f", "-p", "8080"]
                )
            )
            (unit_dir / "sleeper.service").write_text(SLEEP_UNIT)
            node.run(["systemctl", "--user", "daemon-reload"], check=True)
            container, sleep = asyncio.run(_measure(node.env["DBUS_SESSION_BUS_ADDRESS"], n))
        finally:
            node.kill()
    return {"container": _summary(container), "sleep": _summary(sleep)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=10, help="starts per unit")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    result = run(args.n)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for kind, stats in result.items():
        print(f"{kind:9} n={stats['n']}  p50 {stats['p50_ms']:7.1f} ms  p95 {stats['p95_ms']:7.1f} ms")


if __name__ == "__main__":
    main()
