"""Pytest fixtures for lab nodes: real systemd --user managers, killed after each test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetpy.lab import network as labnet
from fleetpy.lab.node import Node, start_node


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """start(name, **kwargs) starts a node under tmp_path; every node is killed afterwards."""
    nodes: list[Node] = []

    def start(name: str, **kwargs) -> Node:
        # A missing systemd, dbus-user-session or tool raises NodeError: the test fails, never skips.
        node = start_node(name, tmp_path, **kwargs)
        nodes.append(node)
        return node

    yield start
    for node in reversed(nodes):
        node.kill()


@pytest.fixture
def systemd_node(node_factory: Callable[..., Node]) -> Node:
    return node_factory("node")


@dataclass(frozen=True)
class LabBridge:
    name: str
    subnet: labnet.Subnet


@pytest.fixture
def lab_bridge(tmp_path: Path) -> Iterator[LabBridge]:
    """A bridge of our own on a free /24, as a lab makes one, for netns nodes; deleted afterwards."""
    name = labnet.new_bridge_name()
    with labnet.host_lock():
        subnet = labnet.free_subnet()
        labnet.claim_bridge(name, subnet.host_interface, tmp_path)
    yield LabBridge(name, subnet)
    assert labnet.release_bridge(name, tmp_path) is None
