"""B13 end to end on a real one-node lab: failures are shown with systemd's reason, not retried.

`fleetctl start` of a unit that fails at once, or cannot load, exits non-zero with the reason
systemd gives; a failed unit is not started again when something else on its machine changes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from labtools import short_lab_dir, wait_for

from fleetpy.cli.fleetctl import cli
from fleetpy.lab.lab import Lab

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lab():
    with short_lab_dir("fprel") as path:
        lab = Lab(path)
        lab.up(node_count=1, network="loopback", agent_ttl="3s", containers=False)
        yield lab


def fleetctl(lab: Lab, *args: str):
    return CliRunner().invoke(cli, ["--endpoint", lab.endpoint(), *args])


def test_start_of_a_failing_unit_exits_non_zero_with_the_exit_status(lab, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    starts = tmp_path / "starts"
    Path("broken.service").write_text(f"[Service]\nExecStart=/bin/sh -c 'echo run >> {starts}; exit 3'\n")
    result = fleetctl(lab, "start", "broken.service")
    assert result.exit_code == 1, result.output
    assert (
        "unit broken.service failed to start: exit-code: the main process exited with status 3"
        in result.output
    )
    status = fleetctl(lab, "list-units", "--no-legend", "--full", "--fields", "unit,active,sub,reason")
    assert status.output == (
        "broken.service\tfailed\tfailed\texit-code: the main process exited with status 3\n"
    )

    # Something else changes on the same machine: the failed unit is not started again.
    Path("fine.service").write_text("[Service]\nExecStart=/bin/sleep 1000\n")
    assert fleetctl(lab, "start", "fine.service").exit_code == 0
    assert starts.read_text() == "run\n"

    # stop then start is the user's way to try again.
    assert fleetctl(lab, "stop", "broken.service").exit_code == 0
    assert fleetctl(lab, "start", "broken.service").exit_code == 1
    wait_for("the second start", lambda: starts.read_text() == "run\nrun\n", timeout=10)
    for name in ("broken.service", "fine.service"):
        fleetctl(lab, "destroy", name)


def test_start_of_a_unit_that_cannot_load_exits_non_zero_with_the_load_error(lab, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("typo.service").write_text("[Service]\nExecStrat=/bin/sleep 1000\n")
    result = fleetctl(lab, "start", "typo.service")
    assert result.exit_code == 1, result.output
    assert (
        "unit typo.service failed to start: bad-setting: Unit typo.service has a bad unit file setting."
        in (result.output)
    )
    assert fleetctl(lab, "destroy", "typo.service").exit_code == 0
