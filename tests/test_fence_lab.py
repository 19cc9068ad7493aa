"""Self-fencing on a real lab partition (item 9): a fenced unit never runs on two machines at
once; the unfenced unit beside it, the baseline, does while the partition lasts."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from bench.fence import measure

pytestmark = pytest.mark.integration


def test_a_fenced_unit_never_runs_twice_across_a_partition():
    base = Path(f"/run/fpfencet{os.getpid()}")
    try:
        result = measure(base, partition_s=12, ttl=5)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    windows = {row["unit"]: row["duplicate_s"] for row in result["rows"]}
    assert windows["fenced.service"] == 0, result
    # Without fencing the partitioned copy runs on: the window the fence closes is real.
    assert windows["plain.service (baseline)"] > 0, result
