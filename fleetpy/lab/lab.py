"""The local multi-node lab: etcd, nodes and their fleetd, recorded in a state file.

Everything the lab creates (cgroups, network namespaces, veths, the bridge, etcd data) is
written to `<dir>/state.json` before it is created, so `down` can remove it all even after
the process that made it crashed. Processes are found through their cgroups, never by name.

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
import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fleetpy.conf.files import write_atomic
from fleetpy.conf.values import format_metadata
from fleetpy.lab import network as labnet
from fleetpy.lab import node as nodes
from fleetpy.lab.etcd import EtcdMember, EtcdMissing, free_port, initial_cluster, start_cluster
from fleetpy.lab.image import (
    BUSYBOX,
    ImageError,
    build_busybox_image,
    prepare_node,
    write_podman_config,
)
from fleetpy.lab.node import Node, NodeError
from fleetpy.lab.state import EtcdState, LabError, NodeState, State
from fleetpy.lab.userdata import UserDataLab, read_user_data_lab
from fleetpy.registry import EtcdStore, Registry, StoreError
from fleetpy.unit.quoting import environment, quote_value

DEFAULT_DIR = Path("/run/fleetpy-lab")
LAB_DROP_IN = "50-lab.conf"
FIRST_LOOPBACK_IP = 11  # node1 is 127.0.0.11 on loopback
# Not 8080: that is where the example web@.service containers listen, on the node's address.
API_PORT = 7001
# Host paths the example units use (web-discovery@ reads /etc/fleetpy/discovery.env, db keeps
# its data in /var/lib/fleetpy/db); inside each node a bind mount shows the node's own
# <dir>/NODE/<name> there, as if every node were a machine of its own.
NODE_PATHS = {"etc-fleetpy": Path("/etc/fleetpy"), "var-lib-fleetpy": Path("/var/lib/fleetpy")}
REPO_ROOT = Path(__file__).parents[2]
KEY_PREFIX = "/_fleetpy/"
REGISTER_TIMEOUT = 20.0
# Applying user-data waits for its start jobs; etcd2's ends once a quorum of members runs.
APPLY_TIMEOUT = 60.0


def check_host() -> None:
    """Fail early, saying what to install, rather than halfway through `up`."""
    problems = []
    if os.geteuid() != 0:
        problems.append("the lab needs root (cgroups, mount and network namespaces): run it with sudo")
    if shutil.which("etcd") is None:
        problems.append("no etcd binary: apt-get install -y etcd-server etcd-client")
    if not os.access(nodes.SYSTEMD, os.X_OK) or shutil.which("systemctl") is None:
        problems.append(f"no {nodes.SYSTEMD}: apt-get install -y systemd")
    if not Path("/usr/lib/systemd/user/dbus.socket").exists() or shutil.which("dbus-daemon") is None:
        problems.append("no D-Bus user session: apt-get install -y dbus dbus-user-session")
    missing = [t for t in ("ip", "nsenter", "unshare", "busctl", "mount") if shutil.which(t) is None]
    if missing:
        problems.append(f"missing {', '.join(missing)}: apt-get install -y iproute2 util-linux systemd")
    if problems:
        raise LabError("cannot run the lab:\n  " + "\n  ".join(problems))


def missing_for_containers() -> str | None:
    """What to install for podman units in the nodes, or None if nothing is missing."""
    missing = [tool for tool in ("podman", "crun") if shutil.which(tool) is None]
    if not os.access(BUSYBOX, os.X_OK):
        missing.append(BUSYBOX)
    if not missing:
        return None
    return f"missing {', '.join(missing)}: apt-get install -y podman crun busybox-static"


class Lab:
    def __init__(self, directory: Path | str = DEFAULT_DIR):
        self.dir = Path(directory).absolute()
        self.state_file = self.dir / "state.json"
        self._state_lock = threading.Lock()
        self.state: State | None = State.load(self.state_file) if self.state_file.exists() else None

    # -- state -------------------------------------------------------------------------------

    def _save(self) -> None:
        assert self.state is not None
        with self._state_lock:
            # A crash leaves the old state or the new one.
            write_atomic(self.state_file, json.dumps(asdict(self.state), indent=1))

    def _require_state(self) -> State:
        if self.state is None:
            raise LabError(
                f"no lab in {self.dir} (no {self.state_file.name}); start one with `fleetpy lab up`"
            )
        return self.state

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One lab command at a time per lab dir."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # Another command may have changed the state while we waited.
            self.state = State.load(self.state_file) if self.state_file.exists() else None
            yield

    # -- up ----------------------------------------------------------------------------------

    def up(  # noqa: C901 - to be split (issue 12)
        self,
        node_count: int = 3,
        etcd_members: int = 1,
        metadata: dict[str, dict[str, str]] | None = None,
        network: str = "auto",
        agent_ttl: str = "10s",
        user_data: str | None = None,
        containers: bool | None = None,
    ) -> list[str]:
        """Start the lab, or what is missing of it; returns notes for the user.

        `containers`: True makes every node ready for podman units (and fails if podman is
        missing), False skips that, None (the default) does it when podman is installed.
        `user_data`: make the machines that cloud-config describes and let it configure them
        (see `_up_from_user_data`); the lab then runs no etcd and no fleetd of its own.
        """
        check_host()
        if etcd_members not in (1, 3):
            raise LabError("--etcd-members must be 1 or 3")
        if not 1 <= node_count <= 200:
            raise LabError("--nodes must be between 1 and 200")
        if len(str(self.dir / "node999" / "run" / "systemd" / "private")) > 100:
            raise LabError(f"{self.dir}: path too long for unix sockets; pick a shorter --dir")
        notes: list[str] = []
        described = read_user_data_lab(user_data) if user_data else None
        if described:
            names = [name for name, _ip in described.nodes]
            if node_count != len(names):
                raise LabError(
                    f"--user-data {user_data} describes {len(names)} machines ({', '.join(names)}); "
                    f"--nodes {node_count} does not match"
                )
            if metadata or etcd_members != 1:
                raise LabError(
                    "with --user-data the user-data configures the machines: "
                    "no --metadata, and no --etcd-members (etcd comes from its coreos.etcd2)"
                )
        else:
            names = [f"node{i}" for i in range(1, node_count + 1)]
        metadata = metadata or {}
        unknown = set(metadata) - set(names)
        if unknown:
            raise LabError(f"--metadata for unknown node(s) {', '.join(sorted(unknown))}")
        if self.state is not None:
            want_etcd = 0 if described else etcd_members
            same_user_data = self.state.user_data == (described.path if described else "")
            if (
                [n.name for n in self.state.nodes] != names
                or len(self.state.etcd) != want_etcd
                or not same_user_data
            ):
                made_from = f" from {self.state.user_data}" if self.state.user_data else ""
                raise LabError(
                    f"a lab{made_from} with {len(self.state.nodes)} nodes and {len(self.state.etcd)} etcd "
                    f"member(s) is already in {self.dir}; run `fleetpy lab down` first"
                )
            return self._repair(notes)
        if described:
            return self._up_from_user_data(described, network, agent_ttl, containers, notes)

        mode = self._choose_network(network, notes)
        with_containers = _choose_containers(containers, notes)
        self.state = State(
            dir=str(self.dir),
            network=mode,
            bridge=None,
            agent_ttl=agent_ttl,
            token_file=str(self._new_token()),
            containers=with_containers,
        )
        try:
            with labnet.host_lock():
                if mode == "netns":
                    subnet = labnet.free_subnet()
                    self.state.bridge, self.state.subnet = labnet.new_bridge_name(), subnet.network
                    ips = [subnet.node_ip(i) for i in range(len(names))]
                else:
                    ips = [f"127.0.0.{FIRST_LOOPBACK_IP + i}" for i in range(len(names))]
                self.state.nodes = [
                    NodeState(name=name, ip=ip, metadata=metadata.get(name, {}))
                    for name, ip in zip(names, ips, strict=True)
                ]
                self._save()  # bridge and subnet are recorded before they exist
                self._claim_bridge()
            with concurrent.futures.ThreadPoolExecutor(len(names) + 1) as pool:
                etcd_done = pool.submit(self._start_etcd, etcd_members)
                started = [pool.submit(self._start_node, n) for n in self.state.nodes]
                etcd_done.result()
                for future in started:
                    future.result()
            for n in self.state.nodes:
                self._start_fleetd(n)
            self._save()
            self.wait_registered()
        except BaseException:
            # Leave nothing half-up behind; the state file still lets a later `down` retry.
            self.down()
            raise
        return notes

    def _new_token(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        token_file = self.dir / "token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        return token_file

    def _up_from_user_data(
        self, described: UserDataLab, network: str, agent_ttl: str, containers: bool | None, notes: list[str]
    ) -> list[str]:
        """Nodes shaped like the machines the user-data describes, configured only by applying it.

        Each node gets the name (hostname) and address of its etcd2 initial-cluster member, on
        a bridge of the lab's own whose host side is .1 of that /24. The lab starts no etcd and
        no fleetd: `fleetpy cloud-config apply` inside each node writes and starts etcd2.service
        and fleet.service in the node's user manager. The lab adds one runtime drop-in to
        fleet.service (`_lab_drop_in`) for what only a lab needs.
        """
        if network == "loopback":
            raise LabError("--user-data gives each machine its own address: it needs --network netns")
        subnet = str(ipaddress.ip_interface(described.bridge_address).network)
        self._choose_network("netns", notes)
        with_containers = _choose_containers(containers, notes)
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
            for name, ip in described.nodes:
                self.state.nodes.append(NodeState(name=name, ip=ip, metadata=described.metadata))
            self._save()  # bridge and subnet are recorded before they exist
            try:
                self._claim_bridge()
            except BaseException:
                self.down()
                raise
        try:
            with concurrent.futures.ThreadPoolExecutor(len(self.state.nodes)) as pool:
                for future in [pool.submit(self._start_node, n) for n in self.state.nodes]:
                    future.result()
            notes += self._provision(self.state.nodes)
            self.wait_registered()
        except BaseException:
            self.down()
            raise
        return notes

    def _provision(self, targets: list[NodeState]) -> list[str]:
        """Apply the lab's user-data inside each node, all at once; returns a note per node.

        All at once, because a static etcd2 member becomes ready (and its start job ends) only
        when a quorum of its peers runs.
        """
        with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
            return list(pool.map(self._apply_user_data, targets))

    def _apply_user_data(self, ns: NodeState) -> str:
        state = self._require_state()
        node = self._node(ns)
        # Runtime, so it is the lab's and not part of the machine's configuration: systemd
        # reads drop-ins from $XDG_RUNTIME_DIR/systemd/user too, after 20-cloudinit.conf.
        drop_in = node.dir / "run" / "systemd" / "user" / "fleet.service.d" / LAB_DROP_IN
        drop_in.parent.mkdir(parents=True, exist_ok=True)
        drop_in.write_text(self._lab_drop_in(ns))
        root = node.dir / "root"
        root.mkdir(exist_ok=True)
        argv = [
            sys.executable, "-m", "fleetpy.cli.fleetpy", "cloud-config", "apply", state.user_data,
            "--root", str(root), "--systemd-bus", "user",
            "--private-ipv4", ns.ip, "--public-ipv4", ns.ip,
        ]  # fmt: skip
        try:
            result = node.run(argv, env_extra={"PYTHONPATH": _pythonpath()}, timeout=APPLY_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise LabError(f"{ns.name}: applying {state.user_data} took over {APPLY_TIMEOUT:.0f}s") from None
        with open(node.dir / "user-data.log", "a") as log:
            log.write(result.stdout + result.stderr)
        if result.returncode != 0:
            raise LabError(
                f"{ns.name}: cloud-config apply {state.user_data} failed:\n"
                f"{(result.stdout + result.stderr)[-2000:]}"
            )
        summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "?"
        return f"{ns.name}: user-data applied: {summary}"

    def _lab_drop_in(self, ns: NodeState) -> str:
        """fleet.service settings only a lab needs: this fleetpy, and per-node paths on a shared host."""
        state = self._require_state()
        node_dir = self.dir / ns.name
        env = {
            # The user-data's ExecStart names where a machine installs fleetd; here it is this venv.
            "PYTHONPATH": _pythonpath(),
            "FLEET_CONFIG": str(node_dir / "root" / "etc" / "fleet" / "fleet.conf"),
            "FLEET_SYSTEMD_BUS": "user",
            # Host paths that every node would otherwise share.
            "FLEET_UNIT_DIR": str(node_dir / "units"),
            "FLEET_API_SOCKET": str(node_dir / "fleet.sock"),
            # As in every lab: peers forward status and journal requests to this node.
            "FLEET_API_LISTEN": f"{ns.ip}:{API_PORT}",
            "FLEET_API_TOKEN_FILE": state.token_file,
        }
        if not state.user_data_sets_agent_ttl:
            env["FLEET_AGENT_TTL"] = state.agent_ttl
        lines = [
            f"# Written by fleetpy lab for {ns.name}; the rest of fleet.service comes from {state.user_data}.",
            "[Service]",
            "ExecStart=",
            f"ExecStart={quote_value(sys.executable)} -m fleetpy.fleetd.main",
        ]
        lines += [environment(key, value) for key, value in env.items()]
        return "\n".join(lines) + "\n"

    def _choose_network(self, network: str, notes: list[str]) -> str:
        if network == "loopback":
            notes.append("network: loopback (127.0.0.x), as asked; partition/heal are not available")
            return "loopback"
        probe = f"fleetpy-probe-{secrets.token_hex(3)}"
        result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
        if result.returncode == 0:
            subprocess.run(["ip", "netns", "delete", probe], capture_output=True, check=False)
            return "netns"
        if network == "netns":
            raise LabError(f"cannot create network namespaces: {result.stderr.strip()}")
        notes.append(
            "network namespaces unavailable ("
            + result.stderr.strip()
            + "): FALLBACK to loopback, nodes share the host network on 127.0.0.x; partition/heal disabled"
        )
        return "loopback"

    def _claim_bridge(self) -> None:
        """Create the bridge the state names, or find it ours; refuse one another lab owns."""
        state = self._require_state()
        if state.bridge:
            labnet.claim_bridge(state.bridge, labnet.Subnet(state.subnet).host_interface, self.dir)

    def _host_ip(self) -> str:
        """Where the host answers the nodes (etcd listens there)."""
        state = self._require_state()
        return labnet.Subnet(state.subnet).host_ip if state.subnet else "127.0.0.1"

    def _start_etcd(self, members: int) -> None:
        state = self._require_state()
        host = self._host_ip()

        def wrap(member: EtcdMember) -> list[str]:
            cgroup = f"fleetpy-lab-{member.name}-{secrets.token_hex(4)}.slice"
            state.etcd.append(
                EtcdState(member.name, member.client_url, member.peer_url, str(member.data_dir), cgroup)
            )
            self._save()  # recorded before it exists
            return nodes.make_cgroup(cgroup)

        try:
            start_cluster(self.dir, members, host=host, wrap=wrap)
        except EtcdMissing as error:
            raise LabError(str(error)) from None
        except RuntimeError as error:
            raise LabError(f"{error}") from None

    def _start_node(self, ns: NodeState) -> None:
        state = self._require_state()

        def record(node: Node) -> None:
            ns.cgroup, ns.netns, ns.veth, ns.env = node.cgroup, node.netns, node.veth, node.env
            self._save()

        node = nodes.start_node(
            ns.name,
            self.dir,
            ip=ns.ip,
            netns=state.network == "netns",
            bridge=state.bridge,
            on_created=record,
        )
        ns.pid, ns.ip = node.pid, node.ip
        ns.machine_id = (node.dir / "machine-id").read_text().strip()
        ns.partitioned = False
        self._save()
        if state.containers:
            self._prepare_containers(ns, node)

    def _prepare_containers(self, ns: NodeState, node: Node) -> None:
        """Podman config, image, crun cgroups and discovery settings for one node, before its fleetd."""
        state = self._require_state()
        podman_dir = node.dir / "podman"
        _podman_reboot(podman_dir)
        env = write_podman_config(podman_dir)
        # `lab shell NODE podman ps` must see the node's containers, as its units do.
        ns.env.update(env)
        self._save()
        try:
            # Per node storage, since container names are per storage; importing takes ~0.2 s
            # and happens once per node dir (the image outlives `down` with the node dir).
            build_busybox_image(podman_env=env)
        except ImageError as error:
            raise LabError(f"{ns.name}: {error}") from None
        for sub in NODE_PATHS:
            (node.dir / sub).mkdir(exist_ok=True)
        (node.dir / "etc-fleetpy" / "discovery.env").write_text(
            f"ETCD_ENDPOINT={state.etcd_urls[0]}\n"
            f"ANNOUNCE_ADDRESS={ns.ip}\n"
            # The sidekick runs the host's python3; fleetpy may be a checkout, not installed.
            f"PYTHONPATH={REPO_ROOT}\n"
        )
        try:
            prepare_node(node, env)
            for sub, path in NODE_PATHS.items():
                # The mount point must exist on the host; it stays empty there, the bind
                # mount lives and dies with the node's mount namespace.
                path.mkdir(parents=True, exist_ok=True)
                node.run(["mount", "--bind", str(node.dir / sub), str(path)], check=True)
        except subprocess.CalledProcessError as error:
            raise LabError(f"{ns.name}: {' '.join(error.cmd)}: {(error.stderr or '').strip()}") from None

    def _start_fleetd(self, ns: NodeState) -> None:
        state = self._require_state()
        node_dir = self.dir / ns.name
        port = API_PORT if state.network == "netns" else free_port(ns.ip)
        argv = [
            sys.executable, "-m", "fleetpy.fleetd.main",
            "--etcd-servers", ",".join(state.etcd_urls),
            "--etcd-key-prefix", KEY_PREFIX,
            "--public-ip", ns.ip,
            "--machine-id", ns.machine_id,
            "--unit-dir", str(node_dir / "units"),
            "--api-socket", str(node_dir / "fleet.sock"),
            "--api-listen", f"{ns.ip}:{port}",
            "--api-token-file", state.token_file,
            "--systemd-bus", "user",
            "--agent-ttl", state.agent_ttl,
        ]  # fmt: skip
        if ns.metadata:
            argv += ["--metadata", format_metadata(ns.metadata)]
        with open(node_dir / "fleetd.log", "ab") as log:
            proc = self._node(ns).popen(
                argv,
                env_extra={"PYTHONPATH": _pythonpath()},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        ns.fleetd_pid = proc.pid  # the helpers exec, so this becomes fleetd's own pid
        self._save()

    def _repair(self, notes: list[str]) -> list[str]:
        """`up` on a lab that exists: restart what died, leave the rest alone."""
        state = self._require_state()
        with labnet.host_lock():
            self._claim_bridge()
        for member in state.etcd:
            if not _cgroup_alive(member.cgroup):
                self.etcd_start(member.name)
                notes.append(f"restarted {member.name}")
        if state.user_data:
            # Like a CoreOS boot, every start of a node applies the user-data; on a node that
            # runs, applying it again changes nothing (each note says so).
            for ns in state.nodes:
                if not _pid_alive(ns.pid):
                    self.kill_node(ns.name)
                    self._start_node(ns)
                    notes.append(f"restarted {ns.name}")
            notes += self._provision(state.nodes)
            self.wait_registered()
            return notes
        for ns in state.nodes:
            if not (_pid_alive(ns.pid) and _pid_alive(ns.fleetd_pid)):
                self.restart_node(ns.name, wait=False)
                notes.append(f"restarted {ns.name}")
        self.wait_registered()
        if not notes:
            notes.append("lab already up; nothing to do")
        return notes

    def wait_registered(self, timeout: float = REGISTER_TIMEOUT, names: list[str] | None = None) -> None:
        """Wait until every (named) node's fleetd is registered in etcd and serves its API.

        Both, because a restarted fleetd finds its previous record still alive for up to a TTL.
        """
        state = self._require_state()
        want = {n.machine_id: n for n in state.nodes if names is None or n.name in names}
        deadline = time.monotonic() + timeout
        while True:
            seen = {
                mid
                for mid in self.machines()
                if mid in want and _api_answers(self.dir / want[mid].name / "fleet.sock")
            }
            if set(want) <= seen:
                return
            for mid, ns in want.items():
                # fleet.service of a user-data lab restarts by itself; only a lab's own fleetd is final.
                if mid not in seen and not state.user_data and not _pid_alive(ns.fleetd_pid):
                    raise LabError(f"fleetd on {ns.name} exited:\n{_tail(self.dir / ns.name / 'fleetd.log')}")
            if time.monotonic() > deadline:
                missing = ", ".join(n.name for m, n in want.items() if m not in seen)
                logs = (
                    "`fleetpy lab shell NODE journalctl --user-unit fleet.service`"
                    if state.user_data
                    else f"{self.dir}/NODE/fleetd.log"
                )
                raise LabError(f"machines not registered after {timeout:.0f}s: {missing}; see {logs}")
            time.sleep(0.1)

    def registry(self, retry_for: float = 1.0) -> Registry:
        """The lab's registry, with short retries: the lab reports, it does not wait out outages."""
        store = EtcdStore(self._require_state().etcd_urls, retry_for=retry_for, request_timeout=1.0)
        return Registry(store, KEY_PREFIX)

    def machines(self) -> set[str]:
        """Ids of the machines registered in etcd; empty if etcd does not answer."""
        try:
            return {m.id for m in self.registry().machines()}
        except StoreError:
            return set()

    def leader(self) -> str | None:
        """Machine id of the fleetd whose engine holds the leader lease."""
        return self.registry().leader()

    def fleetd_alive(self, ns: NodeState) -> bool:
        """Whether the node's fleetd runs: the lab's own process, or a user-data lab's fleet.service."""
        if self._require_state().user_data:
            return _cgroup_alive(f"{ns.cgroup}/{nodes.MANAGER_CGROUP}/app.slice/fleet.service")
        return _pid_alive(ns.fleetd_pid)

    def _own_fleetd(self, name: str) -> NodeState:
        state = self._require_state()
        if state.user_data:
            raise LabError(
                f"fleetd on {name} is the user-data's fleet.service: "
                f"`fleetpy lab shell {name} systemctl --user stop|start fleet.service`"
            )
        return state.node(name)

    def stop_fleetd(self, name: str, crash: bool = False, timeout: float = 10.0) -> None:
        """Stop a node's fleetd (SIGTERM, or SIGKILL to crash it); its units keep running."""
        ns = self._own_fleetd(name)
        if _pid_alive(ns.fleetd_pid):
            os.kill(ns.fleetd_pid, signal.SIGKILL if crash else signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(ns.fleetd_pid):
            if time.monotonic() > deadline:
                raise LabError(f"fleetd on {name} (pid {ns.fleetd_pid}) did not exit in {timeout:.0f}s")
            time.sleep(0.02)

    def start_fleetd(self, name: str) -> None:
        """Start fleetd again on a running node whose fleetd was stopped or killed."""
        ns = self._own_fleetd(name)
        if _pid_alive(ns.fleetd_pid):
            raise LabError(f"fleetd on {name} is already running (pid {ns.fleetd_pid})")
        self._start_fleetd(ns)

    # -- node operations ---------------------------------------------------------------------

    def _node(self, ns: NodeState) -> Node:
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

    def node(self, name: str) -> Node:
        ns = self._require_state().node(name)
        if not _pid_alive(ns.pid):
            raise LabError(f"{name} is not running; `fleetpy lab restart-node {name}`")
        return self._node(ns)

    def kill_node(self, name: str) -> None:
        """Kill a node as a power cut would: every process of it at once, and its network."""
        ns = self._require_state().node(name)
        if ns.cgroup:
            self._node(ns).kill()
        ns.pid = ns.fleetd_pid = 0
        self._save()

    def restart_node(self, name: str, wait: bool = True) -> None:
        ns = self._require_state().node(name)
        self.kill_node(name)
        self._start_node(ns)
        if self._require_state().user_data:
            self._provision([ns])  # as a CoreOS machine applies its user-data at every boot
        else:
            self._start_fleetd(ns)
        if wait:
            self.wait_registered(names=[name])

    def partition(self, name: str) -> None:
        """Cut the node's link: its veth goes down, so it reaches neither etcd nor its peers."""
        ns = self._link_node(name)
        _run(["ip", "link", "set", str(ns.veth), "down"])
        ns.partitioned = True
        self._save()

    def heal(self, name: str) -> None:
        ns = self._link_node(name)
        _run(["ip", "link", "set", str(ns.veth), "up"])
        # The link carries traffic only once its carrier is up again; return when it does.
        operstate = Path("/sys/class/net") / str(ns.veth) / "operstate"
        deadline = time.monotonic() + 5
        while operstate.read_text().strip() != "up" and time.monotonic() < deadline:
            time.sleep(0.02)
        ns.partitioned = False
        self._save()

    def _link_node(self, name: str) -> NodeState:
        state = self._require_state()
        ns = state.node(name)
        if state.network != "netns" or not ns.veth:
            raise LabError("partition/heal need network namespaces; this lab runs on loopback")
        if not _pid_alive(ns.pid):
            raise LabError(f"{name} is not running")
        return ns

    def _etcd(self, which: str) -> tuple[int, EtcdState]:
        state = self._require_state()
        for i, member in enumerate(state.etcd):
            if which in (member.name, str(i)):
                return i, member
        raise LabError(f"no etcd member {which!r}; members: {', '.join(m.name for m in state.etcd)}")

    def etcd_kill(self, which: str) -> str:
        _, member = self._etcd(which)
        nodes.kill_cgroup(member.cgroup, what=member.name)
        return member.name

    def etcd_start(self, which: str) -> str:
        state = self._require_state()
        _, member = self._etcd(which)
        if _cgroup_alive(member.cgroup):
            return member.name
        members = [EtcdMember(m.name, m.client_url, m.peer_url, Path(m.data_dir)) for m in state.etcd]
        me = next(m for m in members if m.name == member.name)
        me.start(
            initial_cluster(members),
            log=self.dir / f"{member.name}.log",
            wrap=nodes.make_cgroup(member.cgroup),
        )
        deadline = time.monotonic() + 10
        while not me.healthy():
            if time.monotonic() > deadline or (me.process and me.process.poll() is not None):
                raise LabError(f"{member.name} did not come back; see {self.dir}/{member.name}.log")
            time.sleep(0.05)
        return member.name

    # -- status and down ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        state = self._require_state()
        machines = self.machines()
        etcd = []
        for member in state.etcd:
            m = EtcdMember(member.name, member.client_url, member.peer_url, Path(member.data_dir))
            etcd.append(
                {
                    "name": member.name,
                    "url": member.client_url,
                    "running": _cgroup_alive(member.cgroup),
                    "healthy": m.healthy(),
                }
            )
        node_rows = []
        for ns in state.nodes:
            rss, pss, procs = _cgroup_memory(ns.cgroup) if ns.cgroup else (0, 0, 0)
            node_rows.append(
                {
                    "name": ns.name,
                    "ip": ns.ip,
                    "machine_id": ns.machine_id,
                    "metadata": ns.metadata,
                    "systemd": _pid_alive(ns.pid),
                    "fleetd": self.fleetd_alive(ns),
                    "registered": ns.machine_id in machines,
                    "partitioned": ns.partitioned,
                    "processes": procs,
                    "rss_kib": rss,
                    "pss_kib": pss,
                }
            )
        return {
            "dir": state.dir,
            "network": state.network,
            "containers": state.containers,
            "bridge": state.bridge,
            "user_data": state.user_data,
            "endpoint": self.endpoint(),
            "etcd": etcd,
            "nodes": node_rows,
        }

    def endpoint(self) -> str:
        state = self._require_state()
        return f"unix://{self.dir / state.nodes[0].name / 'fleet.sock'}"

    def down(self) -> list[str]:  # noqa: C901 - to be split (issue 12)
        """Remove everything the state file lists; safe to repeat, and after a crash."""
        state = self.state
        if state is None:
            return []
        errors: list[str] = []
        for ns in state.nodes:
            if ns.cgroup:
                try:
                    self._node(ns).kill()
                except (NodeError, OSError) as error:
                    errors.append(f"{ns.name}: {error}")
        if state.containers:
            # The containers died with their nodes; forget them too, so podman lists none.
            with concurrent.futures.ThreadPoolExecutor(len(state.nodes)) as pool:
                for ns, result in zip(
                    state.nodes,
                    pool.map(lambda ns: _forget_containers(self.dir / ns.name / "podman"), state.nodes),
                    strict=False,
                ):
                    if result:
                        errors.append(f"{ns.name}: {result}")
        for member in state.etcd:
            try:
                nodes.kill_cgroup(member.cgroup, what=member.name)
            except (NodeError, OSError) as error:
                errors.append(f"{member.name}: {error}")
            shutil.rmtree(member.data_dir, ignore_errors=True)
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
        # Node dirs stay (logs, machine-ids); state, token and etcd data go.
        for name in ("state.json", "token"):
            (self.dir / name).unlink(missing_ok=True)
        for ns in state.nodes:
            (self.dir / ns.name / "fleet.sock").unlink(missing_ok=True)
            if state.user_data:
                # The machines' disks: what the user-data wrote, and etcd2's data (%S is in
                # home). Gone with the machines, so the next `up` provisions fresh ones.
                for disk in ("home", "root"):
                    shutil.rmtree(self.dir / ns.name / disk, ignore_errors=True)
        self.state = None
        return [f"stopped {len(state.nodes)} node(s) and {len(state.etcd)} etcd member(s)", *notes]


def _podman_reboot(podman_dir: Path) -> None:
    """What a reboot does to podman: its runtime state and its tmp dir (where it notices reboots)
    start empty, or it would trust the states of containers that died with their node."""
    for sub in ("run", "tmp"):
        shutil.rmtree(podman_dir / sub, ignore_errors=True)


def _forget_containers(podman_dir: Path) -> str | None:
    """Remove every container record of a dead node's podman storage; returns podman's error."""
    if not (podman_dir / "containers.conf").exists():
        return None
    _podman_reboot(podman_dir)
    env = {**os.environ, **write_podman_config(podman_dir)}
    result = subprocess.run(
        ["podman", "rm", "--all", "--force"], env=env, capture_output=True, text=True, check=False
    )
    return None if result.returncode == 0 else f"podman rm --all: {result.stderr.strip()}"


def _choose_containers(containers: bool | None, notes: list[str]) -> bool:
    missing = missing_for_containers()
    if containers is False:
        return False
    if missing is None:
        return True
    if containers:
        raise LabError(f"--containers: {missing}")
    notes.append(f"containers: off ({missing}); plain units still work")
    return False


def _pythonpath() -> str:
    # The package may be used from a checkout without being installed.
    return os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))


def _api_answers(socket_path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(socket_path))
            return True
        except OSError:
            return False


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        # A zombie is dead for our purposes.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _cgroup_alive(cgroup: str) -> bool:
    procs = nodes.CGROUP_ROOT / "unified" / cgroup / "cgroup.procs"
    try:
        return bool(procs.read_text().split())
    except OSError:
        return False


def _cgroup_memory(cgroup: str) -> tuple[int, int, int]:
    """(RSS KiB, PSS KiB, process count) of everything in the cgroup tree; PSS splits shared pages."""
    top = nodes.CGROUP_ROOT / "unified" / cgroup
    pids: set[int] = set()
    for procs in top.rglob("cgroup.procs"):
        with suppress(OSError):
            pids.update(int(p) for p in procs.read_text().split())
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            pass
    return rss, pss, len(pids)


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return f"(no {path})"


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {result.stderr.strip()}")
