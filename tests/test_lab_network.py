"""The lab's choice of a /24 and its bridge names, without touching the host's network."""

from __future__ import annotations

import ipaddress

import pytest

from fleetpy.lab.network import Subnet, choose_subnet, new_bridge_name, owner_tag
from fleetpy.lab.state import LabError


def nets(*cidrs: str) -> list[ipaddress.IPv4Network]:
    return [ipaddress.ip_network(c) for c in cidrs]


def test_first_free_24_skips_every_routed_one() -> None:
    used = nets("10.251.0.0/24", "10.251.1.0/24", "127.0.0.0/8", "172.17.0.0/16")
    assert choose_subnet(used) == Subnet("10.251.2.0/24")


def test_a_wider_route_covers_every_24_inside_it() -> None:
    used = nets("10.251.0.0/23", "10.251.2.128/25")
    assert choose_subnet(used) == Subnet("10.251.3.0/24")


def test_a_full_pool_is_refused_with_a_reason() -> None:
    with pytest.raises(LabError, match="every /24 of 10.251.0.0/16 is in use"):
        choose_subnet(nets("10.0.0.0/8"))


def test_subnet_addresses_host_side_and_nodes() -> None:
    subnet = Subnet("10.251.7.0/24")
    assert subnet.host_ip == "10.251.7.1"
    assert subnet.host_interface == "10.251.7.1/24"
    assert [subnet.node_ip(i) for i in range(3)] == ["10.251.7.11", "10.251.7.12", "10.251.7.13"]


def test_bridge_names_fit_an_interface_name_and_differ() -> None:
    names = {new_bridge_name() for _ in range(50)}
    assert len(names) == 50
    assert all(len(name) <= 15 for name in names)  # IFNAMSIZ - 1
    assert owner_tag("/run/a") != owner_tag("/run/ab")
