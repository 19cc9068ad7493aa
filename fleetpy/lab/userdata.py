"""A lab made from user-data: the machines a cloud-config file describes, and checks on them."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from fleetpy.cloudinit import CloudConfigError, load
from fleetpy.conf.values import BadValue, parse_metadata
from fleetpy.lab import node as nodes
from fleetpy.lab.state import LabError


@dataclass
class UserDataLab:
    """The machines a user-data file describes: one node per member of its etcd2 initial-cluster."""

    path: str
    nodes: list[tuple[str, str]]  # (name, ip)
    bridge_address: str  # host side of the bridge, e.g. 172.17.8.1/24
    etcd_servers: list[str]
    metadata: dict[str, str]
    sets_agent_ttl: bool


def read_user_data_lab(path: str) -> UserDataLab:
    """The machines user-data `path` describes; refuses what the lab cannot make machines for.

    One machine per member of coreos.etcd2.initial-cluster, named like the member (its %H) with
    the member's peer address; all of them in one /24, whose .1 is the lab bridge's host side.
    """
    try:
        config = load(Path(path).read_text())
    except OSError as error:
        raise LabError(f"--user-data {path}: {error.strerror}") from None
    except CloudConfigError as error:
        raise LabError(f"--user-data {path}: {error}") from None
    members = str(config.etcd2.get("initial_cluster", "")).strip()
    if not members:
        raise LabError(
            f"--user-data {path}: no coreos.etcd2.initial-cluster; the lab makes one machine per member of it"
        )
    machines: list[tuple[str, str]] = []
    for entry in members.split(","):
        name, _, url = entry.strip().partition("=")
        try:
            ip = ipaddress.IPv4Address(urlsplit(url).hostname or "")
        except ValueError:
            raise LabError(
                f"--user-data {path}: member {name}: {url}: the lab needs IPv4 addresses"
            ) from None
        if not nodes.NAME_RE.match(name) or name in dict(machines):
            raise LabError(
                f"--user-data {path}: member name {name!r} cannot name a lab node (or is repeated)"
            )
        machines.append((name, str(ip)))
    subnet = ipaddress.ip_network(f"{machines[0][1]}/24", strict=False)
    host_side = subnet.network_address + 1
    if any(ipaddress.IPv4Address(ip) not in subnet or ip == str(host_side) for _name, ip in machines):
        raise LabError(
            f"--user-data {path}: the lab puts all machines in one /24 ({subnet}) with the host at {host_side}; "
            f"members: {members}"
        )
    ips = {ip for _name, ip in machines}
    servers = [u.strip() for u in str(config.fleet.get("etcd_servers", "")).split(",") if u.strip()]
    # The host reads the registry through the same servers as fleetd, unless those are only
    # meaningful inside a machine (127.0.0.1, $private_ipv4): then through each member.
    if not servers or any(urlsplit(u).hostname not in ips for u in servers):
        servers = [f"http://{ip}:2379" for _name, ip in machines]
    value = config.fleet.get("metadata", "")
    try:
        metadata = (
            parse_metadata(value) if isinstance(value, str) else {str(k): str(v) for k, v in value.items()}
        )
    except BadValue as error:
        raise LabError(f"--user-data {path}: {error}") from None
    return UserDataLab(
        path=str(Path(path).absolute()),
        nodes=machines,
        bridge_address=f"{host_side}/{subnet.prefixlen}",
        etcd_servers=servers,
        metadata=metadata,
        sets_agent_ttl="agent_ttl" in config.fleet,
    )
