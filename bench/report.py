"""`python -m bench report`: PNG charts from the JSON the benchmarks wrote (needs the `bench` extra)."""

from __future__ import annotations

import json
from pathlib import Path


def charts(out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = []
    results = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}

    if "placement" in results:
        rows = results["placement"]["rows"]
        fig, ax = plt.subplots(figsize=(6, 4))
        machines = [r["machines"] for r in rows]
        ax.loglog(machines, [r["fresh_ms"] for r in rows], "o-", label="fresh plan")
        ax.loglog(machines, [r["steady_ms"] for r in rows], "s-", label="steady state (every unit kept)")
        linear = [rows[0]["fresh_ms"] * m / machines[0] for m in machines]
        ax.loglog(machines, linear, ":", color="grey", label="linear from the smallest size")
        ax.set(
            xlabel="machines (units = 10 x machines)",
            ylabel="ms",
            title="Placement time against cluster size",
        )
        ax.legend()
        drawn.append(_save(fig, out / "placement.png"))

    if "e2e" in results:
        result = results["e2e"]
        fig, ax = plt.subplots(figsize=(6, 4))
        latencies = sorted(result["running_after_s"])
        ax.plot(latencies, [i / len(latencies) for i in range(1, len(latencies) + 1)])
        ax.set(
            xlabel="seconds from submit",
            ylabel="fraction of units running",
            title=f"{result['units']} units on {result['machines']} simulated agents",
        )
        drawn.append(_save(fig, out / "e2e_latency.png"))
        fig, ax = plt.subplots(figsize=(6, 4))
        bars = {
            "units/s launched": result["units_per_s"],
            "raw etcd writes/s": result["baseline_etcd_writes_per_s"],
        }
        ax.bar(list(bars), list(bars.values()))
        ax.set(ylabel="per second", title="Throughput against the raw etcd write rate (same run)")
        drawn.append(_save(fig, out / "e2e_throughput.png"))
    return drawn


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
