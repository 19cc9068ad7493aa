"""The local multi-node lab: etcd, nodes and their fleetd, recorded in a state file.

`Lab` coordinates; each concern has a module of its own: host.py (what the host must offer),
network.py (the lab's own bridge and /24), processes.py (etcd members, node managers,
fleetds), provisioning.py (podman, or the lab's user-data, in each node), faults.py (power
cuts, partitions, etcd and fleetd going away) and status.py (what the registry and the
processes say). Everything the lab creates (cgroups, network namespaces, veths, the bridge,
etcd data) is written to `<dir>/state.json` (state.py) before it is created, so `down` can
remove it all even after the process that made it crashed.

Networking: in "netns" mode each node has its own network namespace with an address on a
bridge of the lab's own, in a /24 no other lab or interface of the host uses (10.251.N.0/24,
see lab/network.py); etcd listens on the bridge's host side, .1, which every node reaches
through its veth and which exists only on this host. Without network namespaces ("loopback"
mode) the nodes share the host's network and use 127.0.0.x addresses.

From user-data (`up --user-data FILE`), the nodes are the machines FILE's etcd2 initial-cluster
names, with its addresses on a bridge of their own, and the lab runs no etcd and no fleetd:
applying FILE inside each node starts etcd2.service and fleet.service in the node's manager.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import os
import secrets
import shutil
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from fleetpy.containers import discovery
from fleetpy.lab import etcd_access, faults, processes, provisioning
from fleetpy.lab import metrics as lab_metrics
from fleetpy.lab import network as labnet
from fleetpy.lab import node as nodes
from fleetpy.lab import status as lab_status
from fleetpy.lab.host import check_host, choose_containers, choose_network, missing_for_containers
from fleetpy.lab.node import Node, NodeError
from fleetpy.lab.state import LabError, NodeState, State, StateFile
from fleetpy.lab.userdata import UserDataLab, read_user_data_lab
from fleetpy.registry import Registry

T = TypeVar("T")

__all__ = ["DEFAULT_DIR", "Lab", "LabError", "State", "missing_for_containers"]

DEFAULT_DIR = Path("/run/fleetpy-lab")
FIRST_LOOPBACK_IP = 11  # node1 is 127.0.0.11 on loopback


class Lab:
    """One lab, in one directory: bring it up, break it, report on it, take it down."""

    def __init__(self, directory: Path | str = DEFAULT_DIR):
        self.dir = Path(directory).absolute()
        self.book = StateFile(self.dir)

    @property
    def state(self) -> State | None:
        return self.book.state

    @state.setter
    def state(self, state: State | None) -> None:
        self.book.state = state

    @property
    def state_file(self) -> Path:
        return self.book.path

    def _save(self) -> None:
        self.book.save()

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One lab command at a time per lab dir."""
        with self.book.locked():
            yield

    # -- up ----------------------------------------------------------------------------------

    def up(
        self,
        node_count: int = 3,
        etcd_members: int = 1,
        metadata: dict[str, dict[str, str]] | None = None,
        network: str = "auto",
        agent_ttl: str = "10s",
        user_data: str | None = None,
        containers: bool | None = None,
        etcd_api: str = "v3",
    ) -> list[str]:
        """Start the lab, or what is missing of it; returns notes for the user.

        The lab's etcd serves TLS only, with auth on (lab/etcd_access.py), and its v2 API off;
        `etcd_api="v2"` turns v2 on and runs the fleetds on it, to exercise the v2 backend.

        `containers`: True makes every node ready for podman units (and fails if podman is
        missing), False skips that, None (the default) does it when podman is installed.
        `user_data`: make the machines that cloud-config describes and let it configure them
        (see `_up_from_user_data`); the lab then runs no etcd and no fleetd of its own.
        """
        check_host()
        described = read_user_data_lab(user_data) if user_data else None
        if etcd_api not in ("v2", "v3"):
            raise LabError(f"--etcd-api {etcd_api}: use v3 or v2")
        if described and etcd_api != "v3":
            raise LabError("with --user-data the user-data configures fleet's etcd API (fleet.etcd_api)")
        names = node_names(self.dir, node_count, etcd_members, metadata or {}, described)
        if self.state is not None:
            self._check_same_lab(names, 0 if described else etcd_members, described)
            return self._repair([])
        notes: list[str] = []
        if described:
            return self._up_from_user_data(described, network, agent_ttl, containers, notes)
        return self._up_own(
            names, etcd_members, metadata or {}, network, agent_ttl, containers, etcd_api, notes
        )

    def _check_same_lab(self, names: list[str], etcd_members: int, described: UserDataLab | None) -> None:
        state = self.book.require()
        same_user_data = state.user_data == (described.path if described else "")
        if [n.name for n in state.nodes] != names or len(state.etcd) != etcd_members or not same_user_data:
            made_from = f" from {state.user_data}" if state.user_data else ""
            raise LabError(
                f"a lab{made_from} with {len(state.nodes)} nodes and {len(state.etcd)} etcd "
                f"member(s) is already in {self.dir}; run `fleetpy lab down` first"
            )

    def _up_own(
        self,
        names: list[str],
        etcd_members: int,
        metadata: dict[str, dict[str, str]],
        network: str,
        agent_ttl: str,
        containers: bool | None,
        etcd_api: str,
        notes: list[str],
    ) -> list[str]:
        """A lab with its own etcd and a fleetd of its own on every node."""
        mode = choose_network(network, notes)
        self.state = State(
            dir=str(self.dir),
            network=mode,
            bridge=None,
            agent_ttl=agent_ttl,
            token_file=str(self._new_token()),
            containers=choose_containers(containers, notes),
            etcd_api=etcd_api,
        )
        try:
            self._record_network(names, metadata)
            with concurrent.futures.ThreadPoolExecutor(len(names) + 1) as pool:
                etcd_done = pool.submit(processes.start_etcd, self.book, etcd_members, self._host_ip())
                started = [pool.submit(self._boot_node, n) for n in self.state.nodes]
                etcd_done.result()
                for future in started:
                    future.result()
            for n in self.state.nodes:
                if self.state.containers:
                    provisioning.write_discovery_env(self.book, n)
                processes.start_fleetd(self.book, n)
            self.wait_registered()
        except BaseException:
            # Leave nothing half-up behind; the state file still lets a later `down` retry.
            self.down()
            raise
        return notes

    def _record_network(self, names: list[str], metadata: dict[str, dict[str, str]]) -> None:
        """Choose the nodes' addresses (and a free /24 and a bridge), record them, then make the bridge."""
        state = self.book.require()
        with labnet.host_lock():
            if state.network == "netns":
                subnet = labnet.free_subnet()
                state.bridge, state.subnet = labnet.new_bridge_name(), subnet.network
                ips = [subnet.node_ip(i) for i in range(len(names))]
            else:
                ips = [f"127.0.0.{FIRST_LOOPBACK_IP + i}" for i in range(len(names))]
            state.nodes = [
                NodeState(name=name, ip=ip, metadata=metadata.get(name, {}))
                for name, ip in zip(names, ips, strict=True)
            ]
            self._save()  # bridge and subnet are recorded before they exist
            self._claim_bridge()

    def _up_from_user_data(
        self, described: UserDataLab, network: str, agent_ttl: str, containers: bool | None, notes: list[str]
    ) -> list[str]:
        """Nodes shaped like the machines the user-data describes, configured only by applying it.

        Each node gets the name (hostname) and address of its etcd2 initial-cluster member, on
        a bridge of the lab's own whose host side is .1 of that /24. The lab starts no etcd and
        no fleetd: `fleetpy cloud-config apply` inside each node writes and starts etcd2.service
        and fleet.service in the node's user manager. The lab adds one runtime drop-in to
        fleet.service (provisioning.lab_drop_in) for what only a lab needs.
        """
        if network == "loopback":
            raise LabError("--user-data gives each machine its own address: it needs --network netns")
        subnet = str(ipaddress.ip_interface(described.bridge_address).network)
        choose_network("netns", notes)
        with_containers = choose_containers(containers, notes)
        with labnet.host_lock():
            if owner := labnet.subnet_in_use(described.bridge_address):
                raise LabError(
                    f"--user-data {described.path}: its machines' subnet {subnet} is already used on "
                    f"this host ({owner}); the lab will not put a second one beside it"
                )
            self.state = State(
                dir=str(self.dir),
                network="netns",
                bridge=labnet.new_bridge_name(),
                subnet=subnet,
                agent_ttl=agent_ttl,
                token_file=str(self._new_token()),
                containers=with_containers,
                user_data=described.path,
                user_data_etcd=described.etcd_servers,
                user_data_sets_agent_ttl=described.sets_agent_ttl,
            )
            self.state.nodes = [
                NodeState(name=name, ip=ip, metadata=described.metadata) for name, ip in described.nodes
            ]
            self._save()  # bridge and subnet are recorded before they exist
            try:
                self._claim_bridge()
            except BaseException:
                self.down()
                raise
        try:
            with concurrent.futures.ThreadPoolExecutor(len(self.state.nodes)) as pool:
                for future in [pool.submit(self._boot_node, n) for n in self.state.nodes]:
                    future.result()
            notes += provisioning.provision(self.book, self.state.nodes)
            self.wait_registered()
        except BaseException:
            self.down()
            raise
        return notes

    def _repair(self, notes: list[str]) -> list[str]:
        """`up` on a lab that exists: restart what died, leave the rest alone."""
        state = self.book.require()
        with labnet.host_lock():
            self._claim_bridge()
        for member in state.etcd:
            if not processes.cgroup_alive(member.cgroup):
                self.etcd_start(member.name)
                notes.append(f"restarted {member.name}")
        if state.user_data:
            # Like a CoreOS boot, every start of a node applies the user-data; on a node that
            # runs, applying it again changes nothing (each note says so).
            for ns in state.nodes:
                if not processes.pid_alive(ns.pid):
                    self.kill_node(ns.name)
                    self._boot_node(ns)
                    notes.append(f"restarted {ns.name}")
            notes += provisioning.provision(self.book, state.nodes)
            self.wait_registered()
            return notes
        for ns in state.nodes:
            if not (processes.pid_alive(ns.pid) and processes.pid_alive(ns.fleetd_pid)):
                self.restart_node(ns.name, wait=False)
                notes.append(f"restarted {ns.name}")
        self.wait_registered()
        return notes or ["lab already up; nothing to do"]

    def _boot_node(self, ns: NodeState) -> None:
        """Start the node's manager and, in a lab with containers, make it ready for podman."""
        node = processes.start_node(self.book, ns)
        if self.book.require().containers:
            provisioning.prepare_containers(self.book, ns, node)

    def _new_token(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        token_file = self.dir / "token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        return token_file

    def _claim_bridge(self) -> None:
        """Create the bridge the state names, or find it ours; refuse one another lab owns."""
        state = self.book.require()
        if state.bridge:
            labnet.claim_bridge(state.bridge, labnet.Subnet(state.subnet).host_interface, self.dir)

    def _host_ip(self) -> str:
        """Where the host answers the nodes (etcd listens there)."""
        state = self.book.require()
        return labnet.Subnet(state.subnet).host_ip if state.subnet else "127.0.0.1"

    # -- nodes and faults --------------------------------------------------------------------

    def node(self, name: str) -> Node:
        """A running node, to run commands in."""
        ns = self.book.require().node(name)
        if not processes.pid_alive(ns.pid):
            raise LabError(f"{name} is not running; `fleetpy lab restart-node {name}`")
        return self.book.node(ns)

    def kill_node(self, name: str) -> None:
        """Kill a node as a power cut would: every process of it at once, and its network."""
        faults.kill_node(self.book, name)

    def restart_node(self, name: str, wait: bool = True) -> None:
        """Kill the node if it runs and boot it again (same machine-id), with its fleetd."""
        ns = faults.kill_node(self.book, name)
        self._boot_node(ns)
        if self.book.require().user_data:
            provisioning.provision(self.book, [ns])  # as a CoreOS machine applies its user-data at every boot
        else:
            processes.start_fleetd(self.book, ns)
        if wait:
            self.wait_registered(names=[name])

    def partition(self, name: str) -> None:
        """Cut the node's link: its veth goes down, so it reaches neither etcd nor its peers."""
        faults.partition(self.book, name)

    def heal(self, name: str) -> None:
        faults.heal(self.book, name)

    def etcd_kill(self, which: str) -> str:
        return faults.etcd_kill(self.book, which)

    def etcd_start(self, which: str) -> str:
        return faults.etcd_start(self.book, which)

    def stop_fleetd(self, name: str, crash: bool = False, timeout: float = 10.0) -> None:
        """Stop a node's fleetd (SIGTERM, or SIGKILL to crash it); its units keep running."""
        faults.stop_fleetd(self.book, name, crash, timeout)

    def start_fleetd(self, name: str) -> None:
        """Start fleetd again on a running node whose fleetd was stopped or killed."""
        faults.start_fleetd(self.book, name)

    # -- status ------------------------------------------------------------------------------

    def wait_registered(
        self, timeout: float = lab_status.REGISTER_TIMEOUT, names: list[str] | None = None
    ) -> None:
        """Wait until every (named) node's fleetd is registered in etcd and serves its API."""
        lab_status.wait_registered(self.book, timeout, names)

    def serve_metrics(self, port: int = 0) -> str:
        """Serve every node's metrics on 127.0.0.1 for Prometheus (lab/metrics.py); returns the URL."""
        return lab_metrics.start_server(self.book, port)

    def registry(self, retry_for: float = 1.0) -> Registry:
        """The lab's registry, with short retries: the lab reports, it does not wait out outages."""
        return lab_status.registry(self.book.require(), retry_for)

    def read(self, call: Callable[[Registry], Awaitable[T]], retry_for: float = 1.0) -> T:
        """`call(registry)`, from synchronous code (see lab_status.read)."""
        return lab_status.read(self.book.require(), call, retry_for)

    def machines(self) -> set[str]:
        """Ids of the machines registered in etcd; empty if etcd does not answer."""
        return lab_status.machines(self.book.require())

    def leader(self) -> str | None:
        """Machine id of the fleetd whose engine holds the leader lease."""
        return self.read(lambda r: r.leader())

    def fleetd_alive(self, ns: NodeState) -> bool:
        return lab_status.fleetd_alive(self.book.require(), ns)

    def status(self) -> dict[str, Any]:
        return lab_status.status(self.book)

    def endpoint(self) -> str:
        return lab_status.endpoint(self.book)

    def discovery_etcd(self) -> discovery.Etcd:
        """The lab's etcd as the `discovery` user (what the example sidekicks announce)."""
        state = self.book.require()
        if not state.etcd_secrets:
            return discovery.Etcd(state.etcd_urls[0])
        env = etcd_access.discovery_client_env(Path(state.etcd_secrets), state.etcd_urls[0])
        return discovery.Etcd.from_env(env)

    # -- down --------------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Remove everything the state file lists, and only that; safe to repeat, and after a crash."""
        state = self.state
        if state is None:
            return []
        errors = self._stop_processes(state)
        notes = []
        if state.bridge:
            try:
                if left := labnet.release_bridge(state.bridge, self.dir):
                    notes.append(left)
            except LabError as error:
                errors.append(str(error))
        if errors:
            self._save()
            raise LabError("down left some things behind:\n  " + "\n  ".join(errors))
        self._remove_files(state)
        self.state = None
        return [f"stopped {len(state.nodes)} node(s) and {len(state.etcd)} etcd member(s)", *notes]

    def _stop_processes(self, state: State) -> list[str]:
        """Kill every node and etcd member the state lists; returns what could not be stopped."""
        errors: list[str] = []
        for ns in state.nodes:
            if ns.cgroup:
                try:
                    self.book.node(ns).kill()
                except (NodeError, OSError) as error:
                    errors.append(f"{ns.name}: {error}")
        if state.containers:
            # The containers died with their nodes; forget them too, so podman lists none.
            errors += provisioning.forget_containers(self.book)
        try:
            lab_metrics.stop_server(state)
        except (NodeError, OSError) as error:
            errors.append(f"metrics server: {error}")
        for member in state.etcd:
            try:
                nodes.kill_cgroup(member.cgroup, what=member.name)
            except (NodeError, OSError) as error:
                errors.append(f"{member.name}: {error}")
            shutil.rmtree(member.data_dir, ignore_errors=True)
        return errors

    def _remove_files(self, state: State) -> None:
        # Node dirs stay (logs, machine-ids); state, token, etcd data and etcd secrets go.
        for name in ("state.json", "token"):
            (self.dir / name).unlink(missing_ok=True)
        if state.etcd_secrets:
            shutil.rmtree(state.etcd_secrets, ignore_errors=True)
        for ns in state.nodes:
            (self.dir / ns.name / "fleet.sock").unlink(missing_ok=True)
            for copy in (self.dir / ns.name / "etc-fleetpy").glob("etcd-*"):
                copy.unlink()  # the node's copies of the discovery user's secrets
            if state.user_data:
                # The machines' disks: what the user-data wrote, and etcd2's data (%S is in
                # home). Gone with the machines, so the next `up` provisions fresh ones.
                for disk in ("home", "root"):
                    shutil.rmtree(self.dir / ns.name / disk, ignore_errors=True)


def node_names(
    lab_dir: Path,
    node_count: int,
    etcd_members: int,
    metadata: dict[str, dict[str, str]],
    described: UserDataLab | None,
) -> list[str]:
    """The nodes `up` makes (node1..N, or the user-data's machines); refuses what cannot be made."""
    if etcd_members not in (1, 3, 5):
        raise LabError("--etcd-members must be 1, 3 or 5")
    if not 1 <= node_count <= 200:
        raise LabError("--nodes must be between 1 and 200")
    if len(str(lab_dir / "node999" / "run" / "systemd" / "private")) > 100:
        raise LabError(f"{lab_dir}: path too long for unix sockets; pick a shorter --dir")
    names = [f"node{i}" for i in range(1, node_count + 1)]
    if described:
        names = [name for name, _ip in described.nodes]
        if node_count != len(names):
            raise LabError(
                f"--user-data {described.path} describes {len(names)} machines ({', '.join(names)}); "
                f"--nodes {node_count} does not match"
            )
        if metadata or etcd_members != 1:
            raise LabError(
                "with --user-data the user-data configures the machines: "
                "no --metadata, and no --etcd-members (etcd comes from its coreos.etcd2)"
            )
    if unknown := set(metadata) - set(names):
        raise LabError(f"--metadata for unknown node(s) {', '.join(sorted(unknown))}")
    return names
