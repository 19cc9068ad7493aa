"""Two labs on one host at once: each on its own bridge and /24, neither touching the other.

Real etcd, systemd --user managers, fleetd and network namespaces; needs root and fails (never
skips) when a component is missing.
"""

from __future__ import annotations

import ipaddress
import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest
from labtools import fleetctl, short_lab_dir

from fleetpy.lab import network as labnet
from fleetpy.lab.lab import Lab, LabError
from fleetpy.lab.node import link_exists
from fleetpy.lab.state import State

pytestmark = pytest.mark.integration


def works(lab: Lab) -> None:
    """Its machines are registered, its API answers, its nodes reach its etcd host."""
    state = Lab(lab.dir).state
    assert state is not None and state.subnet and state.bridge
    assert link_exists(state.bridge)
    lab.wait_registered(timeout=10)
    rows = fleetctl(lab, "list-machines", "--no-legend", "--full").splitlines()
    assert sorted(row.split()[1] for row in rows) == sorted(n.ip for n in state.nodes)
    host = labnet.Subnet(state.subnet).host_ip
    node = lab.node(state.nodes[0].name)
    ping = [sys.executable, "-c", f"import socket; socket.create_connection(('{host}', {port(state)}), 2)"]
    assert node.run(ping).returncode == 0


def port(state: State) -> int:
    return int(state.etcd[0].client_url.rsplit(":", 1)[1])


@pytest.fixture
def two_labs() -> Iterator[tuple[Lab, Lab]]:
    with short_lab_dir("fia") as dir_a, short_lab_dir("fib") as dir_b:
        a, b = Lab(dir_a), Lab(dir_b)
        a.up(node_count=2, agent_ttl="2s", containers=False)
        b.up(node_count=2, agent_ttl="2s", containers=False)
        yield a, b


def test_two_labs_run_side_by_side_and_one_down_leaves_the_other(two_labs: tuple[Lab, Lab]) -> None:
    a, b = two_labs
    assert a.state is not None and b.state is not None
    assert a.state.bridge != b.state.bridge
    assert not ipaddress.ip_network(a.state.subnet).overlaps(ipaddress.ip_network(b.state.subnet))
    works(a)
    works(b)
    # Each fleetctl sees only its own lab's machines.
    assert not {n.ip for n in a.state.nodes} & {n.ip for n in b.state.nodes}

    bridge_a = a.state.bridge
    a.down()
    assert not link_exists(str(bridge_a))
    works(b)
    # A node of b comes back after a restart: b's bridge is still b's.
    b.restart_node("node2")
    works(b)


def test_a_lab_refuses_a_bridge_another_lab_owns(two_labs: tuple[Lab, Lab]) -> None:
    a, b = two_labs
    assert a.state is not None and b.state is not None
    with pytest.raises(LabError, match=f"bridge {b.state.bridge} belongs to the lab in {b.dir}"):
        labnet.claim_bridge(str(b.state.bridge), labnet.Subnet(a.state.subnet).host_interface, a.dir)
    # A state file that names b's bridge (copied, or edited by hand) neither joins nor deletes it.
    own_bridge = str(a.state.bridge)
    a.state.bridge = b.state.bridge
    a._save()
    with pytest.raises(LabError, match="will not join it"):
        Lab(a.dir).up(node_count=2)
    notes = Lab(a.dir).down()
    assert any(f"left bridge {b.state.bridge} alone" in note for note in notes)
    assert link_exists(str(b.state.bridge))
    works(b)
    assert labnet.release_bridge(own_bridge, a.dir) is None


def test_down_after_a_crash_before_the_bridge_existed() -> None:
    """A bridge recorded but never created (a crash between the two) is no error for `down`."""
    with short_lab_dir("fic") as lab_dir:
        lab = Lab(lab_dir)
        lab.dir.mkdir(parents=True)
        with labnet.host_lock():
            subnet = labnet.free_subnet()
        lab.state = State(
            dir=str(lab.dir), network="netns", bridge=labnet.new_bridge_name(), subnet=subnet.network,
            agent_ttl="2s", token_file=str(lab.dir / "token"),
        )  # fmt: skip
        lab._save()
        assert Lab(lab.dir).down() == ["stopped 0 node(s) and 0 etcd member(s)"]
        assert not (lab.dir / "state.json").exists()


def test_the_bridge_keeps_its_address_when_the_node_with_the_lowest_one_leaves(tmp_path) -> None:
    # B7 in CI: a bridge takes its lowest port's MAC unless one is set. Killing the node whose
    # veth had it changed the etcd host's MAC under the other nodes: they lost etcd for about 5 s,
    # and healthy machines' records and the leader's lease lapsed.
    bridge, veths = labnet.new_bridge_name(), [f"fq{secrets.token_hex(3)}" for _ in range(2)]
    with labnet.host_lock():
        labnet.claim_bridge(bridge, labnet.free_subnet().host_interface, tmp_path)
    try:
        address = mac(bridge)
        for i, veth in enumerate(veths, 1):
            # The lowest unicast, locally administered addresses there are: below the bridge's own.
            ip(
                "link",
                "add",
                veth,
                "address",
                f"02:00:00:00:00:0{i}",
                "type",
                "veth",
                "peer",
                "name",
                f"{veth}p",
            )
            ip("link", "set", veth, "master", bridge)
        assert mac(bridge) == address
        ip("link", "delete", veths[0])  # the node is killed: its veth goes
        assert mac(bridge) == address
    finally:
        for veth in veths:
            if link_exists(veth):
                ip("link", "delete", veth)
        assert labnet.release_bridge(bridge, tmp_path) is None


def mac(link: str) -> str:
    return (labnet.SYS_NET / link / "address").read_text().strip()


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)
