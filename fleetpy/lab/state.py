"""What the lab records in <dir>/state.json before it creates anything, so `down` always works."""

from __future__ import annotations

import fcntl
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fleetpy.conf.files import write_atomic
from fleetpy.lab.node import Node

STATE_VERSION = 1


class LabError(RuntimeError):
    """Something the user can act on; the message says what."""


@dataclass
class NodeState:
    name: str
    ip: str
    metadata: dict[str, str] = field(default_factory=dict)
    machine_id: str = ""
    # From lab.node.Node; pid 0 means "recorded, not (yet) running".
    pid: int = 0
    cgroup: str = ""
    netns: str | None = None
    veth: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    fleetd_pid: int = 0
    partitioned: bool = False


@dataclass
class EtcdState:
    name: str
    client_url: str
    peer_url: str
    data_dir: str
    cgroup: str


@dataclass
class State:
    dir: str
    network: str  # "netns" or "loopback"
    bridge: str | None  # this lab's own bridge (lab/network.py), None on loopback
    agent_ttl: str
    token_file: str
    containers: bool = False
    etcd: list[EtcdState] = field(default_factory=list)
    nodes: list[NodeState] = field(default_factory=list)
    version: int = STATE_VERSION
    # A lab made from user-data: its path, and the etcd the user-data's etcd2 members form.
    user_data: str = ""
    user_data_etcd: list[str] = field(default_factory=list)
    user_data_sets_agent_ttl: bool = False
    # The bridge's /24 ("10.251.3.0/24"), chosen free on this host; "" on loopback.
    subnet: str = ""
    # `up --metrics`: where the lab serves its nodes' metrics, and the server's cgroup.
    metrics_url: str = ""
    metrics_cgroup: str = ""
    # The lab's own etcd: its TLS and auth files (lab/etcd_access.py), "" if it has none.
    etcd_secrets: str = ""
    # The etcd API the lab's fleetds use; "v2" also turns etcd's v2 API on (off otherwise).
    etcd_api: str = "v3"

    @classmethod
    def load(cls, path: Path) -> State:
        raw = json.loads(path.read_text())
        if raw.get("version") != STATE_VERSION:
            raise LabError(f"{path}: unknown state version {raw.get('version')!r}")
        raw["etcd"] = [EtcdState(**e) for e in raw["etcd"]]
        raw["nodes"] = [NodeState(**n) for n in raw["nodes"]]
        return cls(**raw)

    @property
    def etcd_urls(self) -> list[str]:
        return [e.client_url for e in self.etcd] or self.user_data_etcd

    def node(self, name: str) -> NodeState:
        for n in self.nodes:
            if n.name == name:
                return n
        raise LabError(f"no node {name!r} in the lab; nodes: {', '.join(n.name for n in self.nodes)}")


class StateFile:
    """The lab's <dir>/state.json: the State the lab's parts read and record into.

    Every part of the lab records what it is about to create here before creating it, so
    `down` can find everything even after the process that made it crashed.
    """

    def __init__(self, directory: Path):
        self.dir = directory
        self.path = directory / "state.json"
        self._lock = threading.Lock()  # nodes start in parallel threads, each recording
        self.state: State | None = self._read()

    def _read(self) -> State | None:
        return State.load(self.path) if self.path.exists() else None

    def save(self) -> None:
        assert self.state is not None
        with self._lock:
            # A crash leaves the old state or the new one.
            write_atomic(self.path, json.dumps(asdict(self.state), indent=1))

    def require(self) -> State:
        if self.state is None:
            raise LabError(f"no lab in {self.dir} (no {self.path.name}); start one with `fleetpy lab up`")
        return self.state

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One lab command at a time per lab dir; the state is read again once it is ours."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.state = self._read()
            yield

    def node(self, ns: NodeState) -> Node:
        """The running node `ns` records, to run commands in or to kill."""
        return Node(
            name=ns.name,
            dir=self.dir / ns.name,
            pid=ns.pid,
            env=ns.env,
            ip=ns.ip,
            cgroup=ns.cgroup,
            netns=ns.netns,
            veth=ns.veth,
        )
