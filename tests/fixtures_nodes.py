"""Pytest fixtures for lab nodes: real systemd --user managers, killed after each test."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleetpy.lab.node import Node, remove_bridge, start_node


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


@pytest.fixture
def lab_bridge() -> Iterator[str]:
    """A bridge of our own for netns nodes, deleted afterwards."""
    name = f"fpt{secrets.token_hex(4)}"
    yield name
    remove_bridge(name)
