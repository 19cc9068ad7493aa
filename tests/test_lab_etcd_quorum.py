"""Issue 13, item 8: the lab's etcd at 5 members, as the seed cluster ran it.

On a real lab (5 etcd members on etcd's v3 API, 3 nodes with systemd --user and fleetd):
- with 2 members killed etcd keeps its quorum: a new unit is scheduled and runs, and no unit
  restarts;
- with a 3rd killed etcd has no quorum: every running unit keeps running (the same main PID,
  seen by systemd on its node, through more than three machine TTLs), `fleetctl start` fails
  saying that etcd lost its quorum and that running units keep running, `fleetpy lab status`
  says so, and fleetd logs that scheduling is paused;
- with the members back, the new unit is scheduled and runs, on one machine only, and no unit
  that ran was restarted.
Times are generous: a loaded 2-core machine runs this.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from labtools import short_lab_dir, wait_for

from fleetpy.lab.lab import Lab

pytestmark = pytest.mark.integration

TTL = 5.0  # the fleetds' machine and leader-lease TTL
RUNNING_BEFORE = ("one.service", "two.service", "three.service")


def fleetctl(lab: Lab, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLEETCTL_ENDPOINT": lab.endpoint()}
    argv = [sys.executable, "-m", "fleetpy.cli.fleetctl", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, check=False)


def lab_status(lab: Lab) -> str:
    argv = [sys.executable, "-m", "fleetpy.cli.fleetpy", "lab", "status", "--dir", str(lab.dir)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def main_pids(lab: Lab, unit: str) -> dict[str, int]:
    """The unit's main PID on each node where systemd runs it."""
    assert lab.state is not None
    found = {}
    for ns in lab.state.nodes:
        shown = lab.node(ns.name).run(["systemctl", "--user", "show", "-p", "ActiveState,MainPID", unit])
        fields = dict(line.split("=", 1) for line in shown.stdout.split())
        if fields.get("ActiveState") == "active":
            found[ns.name] = int(fields["MainPID"])
    return found


def all_pids(lab: Lab, units: tuple[str, ...]) -> dict[str, dict[str, int]]:
    return {unit: main_pids(lab, unit) for unit in units}


def fleetd_logs(lab: Lab) -> str:
    assert lab.state is not None
    return "".join((lab.dir / ns.name / "fleetd.log").read_text(errors="replace") for ns in lab.state.nodes)


def unit_file(directory: Path, name: str) -> str:
    path = directory / name
    path.write_text("[Service]\nExecStart=/bin/sleep 100000\n")
    return str(path)


def test_five_etcd_members_lose_two_and_go_on_then_lose_quorum_and_pause_scheduling_only(
    tmp_path: Path,
) -> None:
    with short_lab_dir("fq") as lab_dir:
        lab = Lab(lab_dir)
        lab.up(node_count=3, etcd_members=5, network="loopback", agent_ttl=f"{TTL:g}s", containers=False)
        assert lab.state is not None and len(lab.state.etcd) == 5
        quorum_lost_and_back(lab, tmp_path)


def quorum_lost_and_back(lab: Lab, tmp_path: Path) -> None:
    started = fleetctl(lab, "start", *(unit_file(tmp_path, u) for u in RUNNING_BEFORE))
    assert started.returncode == 0, started.stdout + started.stderr
    wait_for("the first units running", lambda: all(main_pids(lab, u) for u in RUNNING_BEFORE), 60, 0.5)
    pids = all_pids(lab, RUNNING_BEFORE)
    assert all(len(where) == 1 for where in pids.values()), pids

    # Two of five members gone: etcd keeps its quorum, and fleet schedules as before.
    assert lab.etcd_kill("etcd0") == "etcd0" and lab.etcd_kill("etcd1") == "etcd1"
    started = fleetctl(lab, "start", unit_file(tmp_path, "meanwhile.service"))
    assert started.returncode == 0, started.stdout + started.stderr
    wait_for("a unit started with 2 of 5 members dead", lambda: main_pids(lab, "meanwhile.service"), 60, 0.5)
    time.sleep(TTL + 1)  # more than a TTL: heartbeats and the leader lease go on
    assert len(lab.machines()) == 3
    running = (*RUNNING_BEFORE, "meanwhile.service")
    pids["meanwhile.service"] = main_pids(lab, "meanwhile.service")
    assert all_pids(lab, running) == pids

    # A third one gone: no quorum. Nothing that runs stops; scheduling pauses, and says why.
    assert lab.etcd_kill("etcd2") == "etcd2"
    lost = time.monotonic()
    new_unit = unit_file(tmp_path, "new.service")

    def refused_for_no_quorum() -> subprocess.CompletedProcess | None:
        result = fleetctl(lab, "start", "--no-block", new_unit)
        assert result.returncode != 0, f"started without a quorum: {result.stdout}"
        return result if "etcd has lost its quorum" in result.stderr else None

    refused = wait_for("fleetctl saying etcd lost its quorum", refused_for_no_quorum, 120, 0.5)
    said = time.monotonic() - lost
    assert isinstance(refused, subprocess.CompletedProcess)
    assert refused.returncode == 1
    assert "units already running keep running" in refused.stderr, refused.stderr
    status = lab_status(lab)
    assert "etcd has no quorum: 2 of 5 members run, 3 needed" in status, status
    wait_for(
        "fleetd logging that scheduling is paused for the lost quorum",
        lambda: "scheduling paused: etcd has lost its quorum" in fleetd_logs(lab),
        60,
        0.5,
    )
    logged = time.monotonic() - lost
    # Longer than three TTLs without etcd: machine records and leases would long have expired.
    time.sleep(max(0.0, 3 * TTL - (time.monotonic() - lost)))
    assert all_pids(lab, running) == pids
    assert not main_pids(lab, "new.service")

    # The members come back: what was asked for meanwhile runs, once, and nothing restarted.
    restarting = time.monotonic()
    for member in ("etcd0", "etcd1", "etcd2"):
        lab.etcd_start(member)
    back = time.monotonic()

    def started_new() -> bool:
        return fleetctl(lab, "start", "--no-block", new_unit).returncode == 0

    wait_for("fleetctl start accepted again", started_new, 120, 0.5)
    wait_for("new.service running", lambda: main_pids(lab, "new.service"), 120, 0.5)
    resumed = time.monotonic() - back
    restart_took = back - restarting
    assert len(main_pids(lab, "new.service")) == 1
    time.sleep(TTL + 1)  # a machine TTL after: nothing moved or restarted late
    assert all_pids(lab, running) == pids
    assert len(main_pids(lab, "new.service")) == 1
    assert "scheduling resumes" in fleetd_logs(lab)
    assert all(m["healthy"] for m in lab.status()["etcd"])
    print(
        f"\nquorum lost -> fleetctl says why: {said:.1f}s; -> fleetd logs scheduling paused: {logged:.1f}s; "
        f"3 members started again in {restart_took:.1f}s -> new unit running {resumed:.1f}s later"
    )
