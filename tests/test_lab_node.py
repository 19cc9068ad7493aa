"""Lab nodes are isolated machines: own systemd, cgroups, machine-id, and optionally network."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleetpy.lab.node import Node

pytest_plugins = ["fixtures_nodes"]
pytestmark = pytest.mark.integration


def is_active(node: Node, unit: str) -> str:
    return node.run(["systemctl", "--user", "is-active", unit]).stdout.strip()


def start_sleeper(node: Node, unit: str) -> None:
    result = node.run(["systemd-run", "--user", f"--unit={unit}", "sleep", "1000"])
    assert result.returncode == 0, result.stderr


def test_node_answers_on_its_own_bus(systemd_node: Node) -> None:
    result = systemd_node.run(["systemctl", "--user", "is-system-running", "--wait"])
    assert result.stdout.strip() in ("running", "degraded"), result
    assert systemd_node.env["XDG_RUNTIME_DIR"].startswith(str(systemd_node.dir))


def test_node_has_its_own_persistent_machine_id(systemd_node: Node) -> None:
    inside = systemd_node.run(["cat", "/etc/machine-id"]).stdout.strip()
    assert len(inside) == 32 and int(inside, 16) >= 0
    assert inside == (systemd_node.dir / "machine-id").read_text().strip()
    assert inside != Path("/etc/machine-id").read_text().strip()


def test_unit_started_in_one_node_is_invisible_in_the_other(node_factory) -> None:
    a, b = node_factory("a"), node_factory("b")
    start_sleeper(a, "only-a")
    assert "only-a.service" in a.run(["systemctl", "--user", "list-units"]).stdout
    assert "only-a.service" not in b.run(["systemctl", "--user", "list-units", "--all"]).stdout


def test_stopping_hello_in_one_node_spares_the_other(node_factory) -> None:
    a, b = node_factory("a"), node_factory("b")
    start_sleeper(a, "hello")
    start_sleeper(b, "hello")
    b_pid = int(b.run(["systemctl", "--user", "show", "-p", "MainPID", "--value", "hello"]).stdout)
    assert a.run(["systemctl", "--user", "stop", "hello"]).returncode == 0
    assert is_active(a, "hello") == "inactive"
    assert is_active(b, "hello") == "active"
    os.kill(b_pid, 0)  # still alive


def test_popen_runs_in_the_node_cgroup(systemd_node: Node) -> None:
    proc = systemd_node.popen(["sleep", "1000"])
    try:
        deadline = time.monotonic() + 5
        # The pid is the command's own once the helpers have exec'd into it.
        while Path(f"/proc/{proc.pid}/comm").read_text().strip() != "sleep":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        lines = Path(f"/proc/{proc.pid}/cgroup").read_text().splitlines()
        assert {
            line.split(":", 2)[2]
            for line in lines
            if line.split(":")[1] in ("", "name=systemd", "pids", "memory")
        } == {f"/{systemd_node.cgroup}"}
    finally:
        proc.kill()
        proc.wait()


def test_kill_leaves_no_process_cgroup_or_mount(node_factory) -> None:
    node = node_factory("doomed")
    start_sleeper(node, "hello")
    stray = node.popen(["sleep", "1000"])
    unit_pid = int(node.run(["systemctl", "--user", "show", "-p", "MainPID", "--value", "hello"]).stdout)
    pids = [node.pid, stray.pid, unit_pid]
    node.kill()
    stray.wait(timeout=5)
    for pid in pids:
        assert not _alive(pid), pid
    for d in node.cgroup_dirs:
        assert not d.exists(), d
    assert str(node.dir) not in Path("/proc/self/mountinfo").read_text()
    node.kill()  # idempotent


def test_netns_nodes_have_their_ip_and_reach_each_other(node_factory, lab_bridge) -> None:
    ip_a, ip_b = lab_bridge.subnet.node_ip(200), lab_bridge.subnet.node_ip(201)
    a = node_factory("a", ip=ip_a, netns=True, bridge=lab_bridge.name)
    b = node_factory("b", ip=f"{ip_b}/24", netns=True, bridge=lab_bridge.name)
    assert b.ip == ip_b
    assert f"{ip_b}/24" in b.run(["ip", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert (
        f"{ip_b}/"
        not in subprocess.run(["ip", "-o", "addr"], check=True, capture_output=True, text=True).stdout
    )
    (b.dir / "www").mkdir()
    (b.dir / "www" / "hello.txt").write_text("hello from b\n")
    server = b.popen(
        [sys.executable, "-m", "http.server", "--bind", b.ip, "--directory", str(b.dir / "www"), "8080"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    fetch = (
        "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())"
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            result = a.run([sys.executable, "-c", fetch, f"http://{b.ip}:8080/hello.txt"])
            if result.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert result.stdout == "hello from b\n\n", result.stderr
    finally:
        server.kill()
        server.wait()
    netns = [a.netns, b.netns]
    a.kill()
    b.kill()
    listed = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout
    for name in netns:
        assert name and name not in listed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead but not yet reaped by whoever inherited it.
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
