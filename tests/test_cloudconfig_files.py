"""The ready-made user-data in cloud-config/ passes our validator and real cloud-init's schema."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fleetpy.cloudinit import load, validate

pytestmark = pytest.mark.integration

FILES = sorted((Path(__file__).resolve().parent.parent / "cloud-config").glob("*.yaml"))


def test_all_expected_files_are_there() -> None:
    assert {p.name for p in FILES} >= {"cluster.yaml", "cluster-discovery.yaml", "worker.yaml", "es.yaml"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_file_has_no_findings(path: Path) -> None:
    assert validate(path.read_text()) == []


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_file_passes_cloud_init_schema(path: Path) -> None:
    cloud_init = shutil.which("cloud-init")
    # CI installs the Debian package; a missing cloud-init must fail, not skip.
    assert cloud_init, "cloud-init not found: apt-get install -y cloud-init"
    result = subprocess.run(
        [cloud_init, "schema", "--config-file", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_cluster_starts_hello_and_worker_has_no_engine() -> None:
    cluster = load((FILES[0].parent / "cluster.yaml").read_text())
    assert {u.name: u.command for u in cluster.units}["hello.service"] == "start"
    worker = load((FILES[0].parent / "worker.yaml").read_text())
    assert worker.fleet["disable_engine"] is True
    assert worker.fleet["metadata"] == "role=worker"
    es = load((FILES[0].parent / "es.yaml").read_text())
    (unit,) = es.units
    assert (unit.name, unit.command) == ("es.service", "start")
    # The same unit as the library's, so the two cannot drift apart.
    assert unit.content == (FILES[0].parent.parent / "units/es.service").read_text()
