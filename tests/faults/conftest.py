"""The fault suite's lab (3 nodes on network namespaces, one etcd) per registry backend, and its
JSON report.

Every scenario runs on etcd's v3 API; those marked `@pytest.mark.backends("v3", "v2")` run on
the v2 backend too, on a lab of its own (see test_faults.py for which and why). The report (per
backend and scenario: recovery time min/median/max, duplicate window, requests tried and their
answers, crashes, needless restarts, Conflicts violations) is printed at the end of the run and
written to $FLEETPY_FAULTS_REPORT (default faults-report.json in pytest's temp dir).
$FLEETPY_FAULTS_KEEP_LOGS=DIR keeps each lab's logs (fleetd, systemd, etcd) in DIR/<backend>.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent))  # labtools
from harness import AGENT_TTL, Harness  # noqa: E402
from labtools import short_lab_dir  # noqa: E402

from fleetpy.lab.lab import Lab  # noqa: E402

BACKENDS = ("v3", "v2")
_REPORT: dict[str, dict[str, dict]] = {}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "backends(*apis): the registry backends a fault scenario runs on (default: v3 only)"
    )


def pytest_generate_tests(metafunc):
    if "harness" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("backends")
        apis = marker.args if marker else ("v3",)
        assert set(apis) <= set(BACKENDS), apis
        # Session scope: pytest runs every scenario of one backend on its lab, then the next.
        metafunc.parametrize("backend", apis, indirect=True, scope="session")


@pytest.fixture(scope="session")
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def harness(backend):
    with short_lab_dir(f"fp{backend}") as path:
        lab = Lab(path)
        try:
            lab.up(
                node_count=3,
                metadata={"node1": {"role": "db"}, "node2": {"role": "web"}},
                network="netns",
                agent_ttl=f"{AGENT_TTL:.0f}s",
                etcd_api=backend,
            )
            harness = Harness(lab, backend)
            harness.report = _REPORT.setdefault(backend, {})
            harness.submit("node1")
            harness.settle()
            yield harness
        finally:
            if keep := os.environ.get("FLEETPY_FAULTS_KEEP_LOGS"):
                shutil.copytree(
                    path,
                    Path(keep) / backend,
                    dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.sock", "bus", "run", "podman", "units"),
                )


def pytest_terminal_summary(terminalreporter):
    if not _REPORT:
        return
    text = json.dumps({"agent_ttl_s": AGENT_TTL, "backends": _REPORT}, indent=2)
    target = Path(
        os.environ.get("FLEETPY_FAULTS_REPORT")
        or terminalreporter.config._tmp_path_factory.getbasetemp() / "faults-report.json"
    )
    target.write_text(text + "\n")
    terminalreporter.write_sep("=", f"fault report ({target})")
    terminalreporter.write_line(text)
