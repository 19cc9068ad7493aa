"""The lab's processes: etcd members, node managers and fleetds, each recorded before it starts.

Every process runs in a cgroup (or, for fleetd, a pid) that the state file names first, so a
later `down` finds it even if the process that started it died. Processes are found through
those records, never by name.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from fleetpy.conf.values import format_metadata
from fleetpy.lab import etcd_access
from fleetpy.lab import node as nodes
from fleetpy.lab.etcd import TLS, EtcdMember, EtcdMissing, free_port, initial_cluster, start_cluster
from fleetpy.lab.node import Node
from fleetpy.lab.state import EtcdState, LabError, NodeState, State, StateFile

KEY_PREFIX = "/_fleetpy/"
# Not 8080: that is where the example web@.service containers listen, on the node's address.
API_PORT = 7001
REPO_ROOT = Path(__file__).parents[2]
ETCD_RESTART_TIMEOUT = 10.0


def start_etcd(book: StateFile, members: int, host: str) -> None:
    """Start the lab's etcd cluster on `host`, each member in a cgroup recorded first, with
    TLS for clients and peers and auth on (lab/etcd_access.py)."""
    state = book.require()
    secrets_dir = etcd_access.make(book.dir, host)
    state.etcd_secrets = str(secrets_dir)
    book.save()

    def wrap(member: EtcdMember) -> list[str]:
        cgroup = f"fleetpy-lab-{member.name}-{secrets.token_hex(4)}.slice"
        state.etcd.append(
            EtcdState(member.name, member.client_url, member.peer_url, str(member.data_dir), cgroup)
        )
        book.save()  # recorded before it exists
        return nodes.make_cgroup(cgroup)

    v2 = state.etcd_api == "v2"  # etcd's v2 API stays off unless the lab's fleetds use it
    try:
        cluster = start_cluster(
            book.dir,
            members,
            host=host,
            wrap=wrap,
            enable_v2=v2,
            tls=etcd_access.server_tls(secrets_dir),
            health_client=etcd_access.tls(secrets_dir, etcd_access.ROOT),
        )
        etcd_access.lock(cluster[0], secrets_dir, KEY_PREFIX, v2=v2)
    except EtcdMissing as error:
        raise LabError(str(error)) from None
    except subprocess.CalledProcessError as error:
        # etcdctl gets passwords on stdin: its command line holds no secret.
        raise LabError(f"turning etcd's auth on failed: {' '.join(error.cmd)}: {error.stderr}") from None
    except RuntimeError as error:
        raise LabError(f"{error}") from None


def etcd_members(state: State) -> list[EtcdMember]:
    """The lab's etcd members as recorded, with their TLS, to start or ask for health."""
    tls = etcd_access.server_tls(Path(state.etcd_secrets)) if state.etcd_secrets else None
    return [
        EtcdMember(
            m.name, m.client_url, m.peer_url, Path(m.data_dir), enable_v2=state.etcd_api == "v2", tls=tls
        )
        for m in state.etcd
    ]


def etcd_health_client(state: State) -> TLS | None:
    return etcd_access.tls(Path(state.etcd_secrets), etcd_access.ROOT) if state.etcd_secrets else None


def restart_etcd_member(book: StateFile, member: EtcdState) -> None:
    """Start a stopped member again on its data dir, and wait until it is healthy."""
    state = book.require()
    members = etcd_members(state)
    me = next(m for m in members if m.name == member.name)
    me.start(
        initial_cluster(members), log=book.dir / f"{member.name}.log", wrap=nodes.make_cgroup(member.cgroup)
    )
    deadline = time.monotonic() + ETCD_RESTART_TIMEOUT
    while not me.healthy(etcd_health_client(state)):
        if time.monotonic() > deadline or (me.process and me.process.poll() is not None):
            raise LabError(f"{member.name} did not come back; see {book.dir}/{member.name}.log")
        time.sleep(0.05)


def start_node(book: StateFile, ns: NodeState) -> Node:
    """Start the node's systemd --user manager (same machine-id as before, if it ran before)."""
    state = book.require()

    def record(node: Node) -> None:
        ns.cgroup, ns.netns, ns.veth, ns.env = node.cgroup, node.netns, node.veth, node.env
        book.save()

    node = nodes.start_node(
        ns.name, book.dir, ip=ns.ip, netns=state.network == "netns", bridge=state.bridge, on_created=record
    )
    ns.pid, ns.ip = node.pid, node.ip
    ns.machine_id = (node.dir / "machine-id").read_text().strip()
    ns.partitioned = False
    book.save()
    return node


def shared_volume_dir(book: StateFile) -> Path:
    """The lab's stand-in for NFS: one host directory every node's fleetd gets as its shared
    volume directory (fleetd never makes that directory itself, so the lab does)."""
    path = book.dir / "shared-volumes"
    path.mkdir(mode=0o755, exist_ok=True)
    return path


def fleetd_argv(book: StateFile, ns: NodeState) -> list[str]:
    """The lab's own fleetd for node `ns`: its etcd, its paths, its API on the node's address."""
    state = book.require()
    node_dir = book.dir / ns.name
    port = API_PORT if state.network == "netns" else free_port(ns.ip)
    argv = [
        sys.executable, "-m", "fleetpy.fleetd.main",
        "--etcd-servers", ",".join(state.etcd_urls),
        "--etcd-api", state.etcd_api,
        "--etcd-key-prefix", KEY_PREFIX,
        "--public-ip", ns.ip,
        "--machine-id", ns.machine_id,
        "--unit-dir", str(node_dir / "units"),
        "--volume-dir", str(node_dir / "volumes"),
        "--shared-volume-dir", str(shared_volume_dir(book)),
        "--api-socket", str(node_dir / "fleet.sock"),
        "--api-listen", f"{ns.ip}:{port}",
        "--api-token-file", state.token_file,
        "--systemd-bus", "user",
        "--agent-ttl", state.agent_ttl,
        # Each node its own facts directory, read every second, so a lab shows fact changes soon.
        "--facts-dir", str(node_dir / "facts.d"),
        "--facts-interval", "1s",
    ]  # fmt: skip
    if state.etcd_secrets:
        argv += etcd_access.fleetd_flags(Path(state.etcd_secrets), state.etcd_api)
    if ns.metadata:
        argv += ["--metadata", format_metadata(ns.metadata)]
    return argv


def start_fleetd(book: StateFile, ns: NodeState) -> None:
    """Start fleetd inside the node; its pid is recorded (the helpers exec, so it is fleetd's)."""
    with open(book.dir / ns.name / "fleetd.log", "ab") as log:
        proc = book.node(ns).popen(
            fleetd_argv(book, ns),
            env_extra={"PYTHONPATH": pythonpath()},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    ns.fleetd_pid = proc.pid
    book.save()


def stop_fleetd(ns: NodeState, crash: bool = False, timeout: float = 10.0) -> None:
    """SIGTERM (or SIGKILL, to crash it) the node's fleetd and wait until it is gone."""
    if pid_alive(ns.fleetd_pid):
        os.kill(ns.fleetd_pid, signal.SIGKILL if crash else signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(ns.fleetd_pid):
        if time.monotonic() > deadline:
            raise LabError(f"fleetd on {ns.name} (pid {ns.fleetd_pid}) did not exit in {timeout:.0f}s")
        time.sleep(0.02)


def pythonpath() -> str:
    # The package may be used from a checkout without being installed.
    return os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        # A zombie is dead for our purposes.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cgroup_alive(cgroup: str) -> bool:
    procs = nodes.CGROUP_ROOT / "unified" / cgroup / "cgroup.procs"
    try:
        return bool(procs.read_text().split())
    except OSError:
        return False
