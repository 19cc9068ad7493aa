"""What every benchmark shares: percentiles, the table it prints, the JSON it writes."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def summary(samples: Sequence[float]) -> dict[str, float]:
    """p50/p95 in milliseconds of samples in seconds."""
    return {
        "p50_ms": round(statistics.median(samples) * 1000, 2),
        "p95_ms": round(percentile(samples, 0.95) * 1000, 2),
        "n": len(samples),
    }


def table(rows: Sequence[dict]) -> str:
    """Rows of flat dicts as aligned columns (nested values are shown as JSON)."""
    if not rows:
        return "(no rows)"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _cell(value: object) -> str:
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


def write(name: str, result: dict, out: Path = RESULTS) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


@contextmanager
def etcd() -> Iterator[str]:
    """A real one-member etcd on loopback with its data on tmpfs; yields its client URL."""
    import tempfile

    from fleetpy.lab.etcd import start_cluster

    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="fleetpy-bench-") as base:
        members = start_cluster(Path(base), enable_v2=True)  # the v2 backend needs it
        try:
            yield members[0].client_url
        finally:
            for member in members:
                member.stop()
