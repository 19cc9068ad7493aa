"""The lab's network on the host: a bridge and a /24 of its own, chosen free and owned by one lab.

Two labs on one host must never share a bridge or a subnet, and one lab's `down` must never
remove another's bridge. So each lab picks a /24 that no host route covers and a bridge name of
its own, records both in its state file, and only then creates the bridge, while holding a
host-wide lock (so two `up`s at once cannot pick the same /24). The bridge carries its owner in
its interface alias (`ip link ... alias`), which is what `claim_bridge` and `release_bridge`
check: a lab joins or deletes only a bridge that names its own directory.
"""

from __future__ import annotations

import fcntl
import ipaddress
import secrets
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fleetpy.lab.state import LabError

# Where netns labs take their /24s from: 10.251.0.0/24, 10.251.1.0/24, ...
SUBNET_POOL = ipaddress.ip_network("10.251.0.0/16")
HOST_LOCK = Path("/run/fleetpy-lab-network.lock")
FIRST_NODE_HOST = 11  # node1 is .11
OWNER_PREFIX = "fleetpy-lab "
SYS_NET = Path("/sys/class/net")
# `ip route` route types that come before the destination.
_ROUTE_TYPES = {
    "unicast", "local", "broadcast", "multicast", "anycast",
    "unreachable", "blackhole", "prohibit", "throw", "nat",
}  # fmt: skip


@dataclass(frozen=True)
class Subnet:
    """A lab's /24: the host side of its bridge is .1, node i (from 0) is .11+i."""

    network: str  # "10.251.3.0/24"

    @property
    def host_ip(self) -> str:
        return str(ipaddress.ip_network(self.network).network_address + 1)

    @property
    def host_interface(self) -> str:
        return f"{self.host_ip}/{ipaddress.ip_network(self.network).prefixlen}"

    def node_ip(self, index: int) -> str:
        return str(ipaddress.ip_network(self.network).network_address + FIRST_NODE_HOST + index)


def new_bridge_name() -> str:
    """A bridge name no other lab has (interface names hold at most 15 characters)."""
    return f"fleetpy-{secrets.token_hex(3)}"


def owner_tag(lab_dir: Path | str) -> str:
    return f"{OWNER_PREFIX}{lab_dir}"


def choose_subnet(
    used: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network], pool: ipaddress.IPv4Network = SUBNET_POOL
) -> Subnet:
    """The first /24 of `pool` that overlaps none of the `used` networks."""
    taken = list(used)
    for candidate in pool.subnets(new_prefix=24):
        if not any(candidate.overlaps(net) for net in taken):
            return Subnet(str(candidate))
    raise LabError(f"every /24 of {pool} is in use on this host; take a lab down first")


def host_routes() -> list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]]:
    """(destination, device) of every IPv4 route of the host, in all tables."""
    result = subprocess.run(
        ["ip", "-o", "-4", "route", "show", "table", "all"], capture_output=True, text=True, check=False
    )
    routes = []
    for line in result.stdout.splitlines():
        fields = line.split()
        dest = fields[1] if fields[0] in _ROUTE_TYPES else fields[0]
        if dest == "default":
            continue
        dev = fields[fields.index("dev") + 1] if "dev" in fields else "-"
        try:
            routes.append((ipaddress.ip_network(dest, strict=False), dev))
        except ValueError:
            continue
    return routes


def subnet_in_use(interface: str) -> str | None:
    """A route of the host that overlaps `interface`'s network, e.g. docker0's 172.17.0.0/16."""
    network = ipaddress.ip_interface(interface).network
    for dest, dev in host_routes():
        if dest.overlaps(network):
            return f"{dest} on {dev}"
    return None


def free_subnet() -> Subnet:
    """A /24 of SUBNET_POOL that no route of the host covers; call it under `host_lock`."""
    return choose_subnet(dest for dest, _dev in host_routes())


@contextmanager
def host_lock() -> Iterator[None]:
    """One lab at a time chooses a subnet and creates its bridge, so no two choose the same."""
    with open(HOST_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def bridge_owner(bridge: str) -> str | None:
    """The owner tag in the bridge's alias ("" without one), or None if no such link exists."""
    try:
        return (SYS_NET / bridge / "ifalias").read_text().strip()
    except FileNotFoundError:
        return None


def claim_bridge(bridge: str, host_interface: str, lab_dir: Path | str) -> None:
    """Create `bridge` with `host_interface` for the lab in `lab_dir`, or find it made by that lab.

    Refuses a bridge that exists without naming this lab as its owner: another lab's, or not a
    lab's at all.
    """
    owner = bridge_owner(bridge)
    tag = owner_tag(lab_dir)
    if owner is None:
        _ip("link", "add", "name", bridge, "type", "bridge")
        # Pin the address it was made with: otherwise a bridge takes its lowest port's address,
        # so killing the node whose veth had it changes the etcd host's MAC under every other
        # node, and they lose etcd for seconds (their heartbeats and the leader's lease lapse).
        _ip("link", "set", "dev", bridge, "address", (SYS_NET / bridge / "address").read_text().strip())
        _ip("link", "set", "dev", bridge, "alias", tag)
    elif owner != tag:
        whose = (
            f"the lab in {owner.removeprefix(OWNER_PREFIX)}" if owner.startswith(OWNER_PREFIX) else "no lab"
        )
        raise LabError(f"bridge {bridge} belongs to {whose}, not to {lab_dir}; the lab will not join it")
    present = subprocess.run(
        ["ip", "-o", "-4", "addr", "show", "dev", bridge], capture_output=True, text=True, check=False
    ).stdout
    if f" {host_interface} " not in present:
        _ip("addr", "add", host_interface, "dev", bridge)
    _ip("link", "set", bridge, "up")


def release_bridge(bridge: str, lab_dir: Path | str) -> str | None:
    """Delete `bridge` if the lab in `lab_dir` owns it; returns why it was left, if it was."""
    owner = bridge_owner(bridge)
    if owner is None:
        return None
    if owner != owner_tag(lab_dir):
        return f"left bridge {bridge} alone: it belongs to {owner or 'no lab'}"
    _ip("link", "delete", bridge)
    return None


def set_link(name: str, up: bool, carrier_timeout: float = 5.0) -> None:
    """Take link `name` down, or bring it up and return once its carrier is (it carries traffic)."""
    _ip("link", "set", name, "up" if up else "down")
    if not up:
        return
    operstate = SYS_NET / name / "operstate"
    deadline = time.monotonic() + carrier_timeout
    while operstate.read_text().strip() != "up" and time.monotonic() < deadline:
        time.sleep(0.02)


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {result.stderr.strip()}")
