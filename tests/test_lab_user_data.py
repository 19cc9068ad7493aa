"""A lab made from cloud-config/cluster.yaml alone: its nodes are configured only by applying it.

Real etcd (the user-data's etcd2 members, in the nodes), real systemd --user managers and the
user-data's fleet.service; needs root, etcd, systemd, dbus-user-session and iproute2, and fails
(never skips) without them. The machines get the file's own addresses, 172.17.8.101-103, on a
bridge only this lab uses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from labtools import fleetctl, short_lab_dir

from fleetpy.lab.lab import Lab, LabError
from fleetpy.lab.network import subnet_in_use
from fleetpy.lab.node import link_exists

pytestmark = pytest.mark.integration

USER_DATA = Path(__file__).parents[1] / "cloud-config" / "cluster.yaml"
MACHINES = {"core-01": "172.17.8.101", "core-02": "172.17.8.102", "core-03": "172.17.8.103"}
CGROUP_UNIFIED = Path("/sys/fs/cgroup/unified")


def fleetpy(*args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "fleetpy.cli.fleetpy", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)


def in_node(lab: Lab, name: str, *argv: str) -> str:
    return lab.node(name).run(list(argv)).stdout.strip()


def apply_in_node(lab: Lab, name: str, user_data: Path) -> subprocess.CompletedProcess:
    node = lab.node(name)
    argv = [
        sys.executable, "-m", "fleetpy.cli.fleetpy", "cloud-config", "apply", str(user_data),
        "--root", str(node.dir / "root"), "--systemd-bus", "user",
        "--private-ipv4", node.ip, "--public-ipv4", node.ip,
    ]  # fmt: skip
    return node.run(argv, timeout=60)


def fleet_main_pid(lab: Lab, name: str) -> str:
    return in_node(lab, name, "systemctl", "--user", "show", "-p", "MainPID", "--value", "fleet.service")


def unit_files(lab: Lab, name: str) -> dict[str, bytes | str]:
    """Every file and link the user-data made in a node: path -> content or link target."""
    found: dict[str, bytes | str] = {}
    for top in (lab.dir / name / "home", lab.dir / name / "root"):
        for path in sorted(top.rglob("*")):
            if "etcd2" in path.relative_to(top).parts[:2] and not path.name.startswith("etcd2.service"):
                continue  # etcd's data dir (%S/etcd2) changes as the cluster runs
            if path.is_symlink():
                found[str(path)] = os.readlink(path)
            elif path.is_file():
                found[str(path)] = path.read_bytes()
    return found


@pytest.fixture(scope="module")
def lab_dir() -> Iterator[Path]:
    with short_lab_dir("fpu") as path:
        yield path


@pytest.fixture(scope="module")
def lab(lab_dir: Path) -> Lab:
    started = time.monotonic()
    result = fleetpy("lab", "up", "--dir", str(lab_dir), "--user-data", str(USER_DATA), "--no-containers")
    elapsed = time.monotonic() - started
    print(f"\nlab up --user-data {USER_DATA.name} (3 nodes): {elapsed:.2f}s\n{result.stdout}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert elapsed < 20, f"lab up took {elapsed:.1f}s"
    return Lab(lab_dir)


def test_nodes_are_the_machines_the_user_data_describes(lab: Lab) -> None:
    assert lab.state is not None
    assert {n.name: n.ip for n in lab.state.nodes} == MACHINES
    # The lab started no etcd and no fleetd of its own: both are the user-data's units.
    assert lab.state.etcd == []
    assert all(n.fleetd_pid == 0 for n in lab.state.nodes)
    for name in MACHINES:
        assert in_node(lab, name, "hostname") == name
        states = in_node(lab, name, "systemctl", "--user", "is-active", "etcd2.service", "fleet.service")
        assert states.split() == ["active", "active"]
        # "masked-runtime" when the lab dir is below /run, where systemd sees runtime config.
        assert in_node(lab, name, "systemctl", "--user", "is-enabled", "etcd.service").startswith("masked")


def test_the_user_data_unit_runs_on_every_node(lab: Lab) -> None:
    for name in MACHINES:
        assert in_node(lab, name, "systemctl", "--user", "is-active", "hello.service") == "active"
        deadline = time.monotonic() + 5
        # %H in the unit resolves to the node's own hostname.
        while f"hello from {name}" not in in_node(lab, name, "journalctl", "--user-unit", "hello.service"):
            assert time.monotonic() < deadline, f"no hello from {name} in its journal"
            time.sleep(0.1)


def test_fleet_sees_three_machines_with_the_user_data_metadata(lab: Lab) -> None:
    rows = [line.split() for line in fleetctl(lab, "list-machines", "--no-legend", "--full").splitlines()]
    assert sorted(row[1] for row in rows) == sorted(MACHINES.values())
    assert all(row[2] == "cluster=vagrant,role=services" for row in rows), rows
    # The etcd the fleetds share is the user-data's etcd2 cluster: one member per node.
    members = in_node(lab, "core-01", "etcdctl", "--endpoints", "http://172.17.8.101:2379", "member", "list")
    assert sorted(line.split(", ")[2] for line in members.splitlines()) == sorted(MACHINES)


def test_fleetctl_starts_a_plain_unit(lab: Lab, tmp_path: Path) -> None:
    unit = tmp_path / "plain.service"
    unit.write_text("[Service]\nExecStart=/bin/sleep 1000\n")
    fleetctl(lab, "start", str(unit))
    try:
        rows = [line.split() for line in fleetctl(lab, "list-units", "--no-legend", "--full").splitlines()]
        row = next(r for r in rows if r[0] == "plain.service")
        assert row[2:] == ["active", "running"]
        node = next(name for name, ip in MACHINES.items() if row[1].endswith(f"/{ip}"))
        assert in_node(lab, node, "systemctl", "--user", "is-active", "plain.service") == "active"
    finally:
        fleetctl(lab, "destroy", "plain.service")


def test_applying_the_user_data_again_changes_nothing(lab: Lab) -> None:
    before = {name: (unit_files(lab, name), fleet_main_pid(lab, name)) for name in MACHINES}
    result = apply_in_node(lab, "core-02", USER_DATA)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "no changes", result.stdout
    # `up` again on the running lab applies it on every node, and that changes nothing either.
    again = fleetpy("lab", "up", "--dir", str(lab.dir), "--user-data", str(USER_DATA), "--no-containers")
    assert again.returncode == 0, again.stdout + again.stderr
    for name in MACHINES:
        assert f"note: {name}: user-data applied: no changes" in again.stdout
    assert {name: (unit_files(lab, name), fleet_main_pid(lab, name)) for name in MACHINES} == before


def test_bad_user_data_changes_nothing(lab: Lab, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(USER_DATA.read_text().replace("command: start", "command: begin", 1))
    before = unit_files(lab, "core-01")
    result = apply_in_node(lab, "core-01", bad)
    assert result.returncode == 1
    assert "nothing was changed" in result.stderr
    assert unit_files(lab, "core-01") == before
    # Nor does `up`: a lab from other user-data is refused while this one runs.
    other = fleetpy("lab", "up", "--dir", str(lab.dir), "--user-data", str(bad))
    assert other.returncode == 1
    assert unit_files(lab, "core-01") == before


def test_user_data_the_lab_cannot_make_machines_for_is_refused(tmp_path: Path) -> None:
    worker = Path(__file__).parents[1] / "cloud-config" / "worker.yaml"
    with pytest.raises(LabError, match="no coreos.etcd2.initial-cluster"):
        Lab(tmp_path / "lab").up(user_data=str(worker))
    assert not (tmp_path / "lab" / "state.json").exists()
    # Addresses already routed on this host (loopback's everywhere) are never put on the bridge.
    assert subnet_in_use("127.0.0.1/24") is not None


def test_restarted_node_applies_the_user_data_again(lab: Lab) -> None:
    lab.kill_node("core-03")
    lab.restart_node("core-03")
    assert in_node(lab, "core-03", "systemctl", "--user", "is-active", "hello.service") == "active"
    rows = fleetctl(lab, "list-machines", "--no-legend").splitlines()
    assert len(rows) == 3


def test_down_leaves_nothing(lab: Lab) -> None:
    assert lab.state is not None
    cgroups = [n.cgroup for n in lab.state.nodes]
    netns = [n.netns for n in lab.state.nodes]
    bridge = str(lab.state.bridge)
    assert link_exists(bridge)
    result = fleetpy("lab", "down", "--dir", str(lab.dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert not link_exists(bridge)
    assert not any((CGROUP_UNIFIED / cgroup).exists() for cgroup in cgroups)
    assert not any(Path("/run/netns", str(name)).exists() for name in netns)
    for name in MACHINES:
        assert not (lab.dir / name / "home").exists() and not (lab.dir / name / "root").exists()
