"""Per-node cluster user-data from one template, for Vagrant machines and cloud images.

The same text serves real cloud-init (it writes and runs the bootstrap, which installs
fleetpy) and `fleetpy cloud-config apply` (which reads the coreos: section).
vagrant/user-data.erb renders the same template in Ruby for the Vagrantfile; a test keeps
the two identical.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import jinja2

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
BOOTSTRAP = TEMPLATES / "fleetpy-bootstrap.sh"
# coreos-vagrant's addressing: node i (from 1) is 172.17.8.(100 + i).
DEFAULT_SUBNET_PREFIX = "172.17.8."


def default_member_ips(count: int) -> list[str]:
    return [f"{DEFAULT_SUBNET_PREFIX}{100 + i}" for i in range(1, count + 1)]


def node_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:02d}"


def render_cluster_user_data(
    n: int,
    index: int,
    ip: str,
    *,
    member_ips: Sequence[str] | None = None,
    name_prefix: str = "core",
    metadata: str = "role=services",
    fleetpy_source: str = "/vagrant",
    ssh_authorized_keys: Sequence[str] = (),
    cluster_token: str = "fleetpy-cluster",
) -> str:
    """The user-data of node `index` (1-based) of an `n`-node cluster whose address is `ip`.

    `member_ips` lists every node's address in order (default: 172.17.8.101 upwards);
    `fleetpy_source` is what pip installs on the machine (the synced checkout for Vagrant,
    e.g. a git URL on a cloud).
    """
    ips = list(member_ips) if member_ips is not None else default_member_ips(n)
    if len(ips) != n:
        raise ValueError(f"{n} nodes need {n} member addresses, got {len(ips)}")
    if not 1 <= index <= n:
        raise ValueError(f"node index {index} is not between 1 and {n}")
    for address in ips:
        ipaddress.IPv4Address(address)
    if ips[index - 1] != ip:
        raise ValueError(f"node {index} has address {ips[index - 1]}, not {ip}")
    names = [node_name(name_prefix, i) for i in range(1, n + 1)]
    return _template().render(
        name=names[index - 1],
        index=index,
        count=n,
        ip=ip,
        initial_cluster=",".join(f"{name}=http://{a}:2380" for name, a in zip(names, ips, strict=True)),
        etcd_servers=",".join(f"http://{a}:2379" for a in ips),
        metadata=metadata,
        fleetpy_source=fleetpy_source,
        ssh_authorized_keys=list(ssh_authorized_keys),
        cluster_token=cluster_token,
        bootstrap=BOOTSTRAP.read_text().rstrip("\n"),
    )


@cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # YAML, not HTML; values are quoted with tojson where needed
    )
    return env.get_template("user-data.yaml.j2")
