"""Benchmark: start latency (start job -> active) of a podman container unit vs a plain sleep unit.

Both run in the same lab node in the same run, alternating, so host noise hits
both alike. `systemctl --user start` returns when the start job is done, i.e.
when the unit is active (Type=notify: once conmon reports READY=1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from fleetpy.containers.generate import generate_unit
from fleetpy.containers.image import DEFAULT_IMAGE, build_busybox_image, prepare_node, write_podman_config
from fleetpy.lab.node import Node, start_node

SLEEP_UNIT = "[Service]\nExecStart=/bin/sleep 3600\n"


def _start_stop(node: Node, unit: str) -> float:
    started = time.monotonic()
    node.run(["systemctl", "--user", "start", unit], check=True)
    elapsed = time.monotonic() - started
    if node.run(["systemctl", "--user", "is-active", unit]).stdout.strip() != "active":
        raise RuntimeError(f"{unit} is not active after its start job")
    node.run(["systemctl", "--user", "stop", unit], check=True)
    return elapsed


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
                generate_unit("web@.service", DEFAULT_IMAGE, network="none", command=["httpd", "-f", "-p", "8080"])
            )
            (unit_dir / "sleeper.service").write_text(SLEEP_UNIT)
            node.run(["systemctl", "--user", "daemon-reload"], check=True)
            container: list[float] = []
            sleep: list[float] = []
            for _ in range(n):
                container.append(_start_stop(node, "web@bench.service"))
                sleep.append(_start_stop(node, "sleeper.service"))
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
