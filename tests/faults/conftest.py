"""The fault suite's lab (3 nodes on network namespaces, one etcd) and its JSON report.

The report (per scenario: recovery time min/median/max, duplicate window, requests tried and
their answers, crashes, needless restarts, Conflicts violations) is printed at the end of the
run and written to $FLEETPY_FAULTS_REPORT (default faults-report.json in pytest's temp dir).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent))  # labtools
from harness import AGENT_TTL, Harness  # noqa: E402
from labtools import short_lab_dir  # noqa: E402

from fleetpy.lab.lab import Lab  # noqa: E402

_REPORT: dict[str, dict] = {}


@pytest.fixture(scope="session")
def harness():
    with short_lab_dir("fph") as path:
        lab = Lab(path)
        lab.up(
            node_count=3,
            metadata={"node1": {"role": "db"}, "node2": {"role": "web"}},
            network="netns",
            agent_ttl=f"{AGENT_TTL:.0f}s",
        )
        harness = Harness(lab)
        harness.report = _REPORT
        harness.submit("node1")
        harness.settle()
        yield harness


def pytest_terminal_summary(terminalreporter):
    if not _REPORT:
        return
    text = json.dumps({"agent_ttl_s": AGENT_TTL, "scenarios": _REPORT}, indent=2)
    target = Path(
        os.environ.get("FLEETPY_FAULTS_REPORT")
        or terminalreporter.config._tmp_path_factory.getbasetemp() / "faults-report.json"
    )
    target.write_text(text + "\n")
    terminalreporter.write_sep("=", f"fault report ({target})")
    terminalreporter.write_line(text)
