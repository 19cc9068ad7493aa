"""The benchmark suite runs: `python -m bench --quick` (what CI runs) works and writes its JSON.

Times are not checked here; the benchmarks measure them against baselines of their own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def test_every_benchmark_runs_in_quick_mode_and_writes_json(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    from bench.__main__ import BENCHES

    for name in BENCHES:
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["bench"] == name and result["quick"] is True
        assert f"== {name}:" in done.stdout


def test_placement_keeps_the_flags_and_fields_of_bench_schedule(tmp_path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "placement",
            "--sizes",
            "10x100",
            "--repeat",
            "1",
            "--json",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    (row,) = json.loads(done.stdout)["rows"]
    assert (row["machines"], row["units"], row["placed"]) == (10, 100, 100)
    assert row["fresh_ms"] > 0 and row["steady_ms"] > 0
