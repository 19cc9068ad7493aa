"""Breaking the lab on purpose: power cuts, partitions, etcd members and fleetds going away."""

from __future__ import annotations

from fleetpy.lab import network as labnet
from fleetpy.lab import node as nodes
from fleetpy.lab import processes
from fleetpy.lab.state import EtcdState, LabError, NodeState, StateFile


def kill_node(book: StateFile, name: str) -> NodeState:
    """Kill a node as a power cut would: every process of it at once, and its network."""
    ns = book.require().node(name)
    if ns.cgroup:
        book.node(ns).kill()
    ns.pid = ns.fleetd_pid = 0
    book.save()
    return ns


def partition(book: StateFile, name: str) -> None:
    """Cut the node's link: its veth goes down, so it reaches neither etcd nor its peers."""
    ns = _linked_node(book, name)
    labnet.set_link(str(ns.veth), up=False)
    ns.partitioned = True
    book.save()


def heal(book: StateFile, name: str) -> None:
    ns = _linked_node(book, name)
    labnet.set_link(str(ns.veth), up=True)
    ns.partitioned = False
    book.save()


def etcd_kill(book: StateFile, which: str) -> str:
    member = etcd_member(book, which)
    nodes.kill_cgroup(member.cgroup, what=member.name)
    return member.name


def etcd_start(book: StateFile, which: str) -> str:
    member = etcd_member(book, which)
    if not processes.cgroup_alive(member.cgroup):
        processes.restart_etcd_member(book, member)
    return member.name


def etcd_member(book: StateFile, which: str) -> EtcdState:
    """An etcd member by name (etcd0) or index (0)."""
    state = book.require()
    for i, member in enumerate(state.etcd):
        if which in (member.name, str(i)):
            return member
    raise LabError(f"no etcd member {which!r}; members: {', '.join(m.name for m in state.etcd)}")


def stop_fleetd(book: StateFile, name: str, crash: bool = False, timeout: float = 10.0) -> None:
    """Stop a node's fleetd (SIGTERM, or SIGKILL to crash it); its units keep running."""
    processes.stop_fleetd(_own_fleetd(book, name), crash, timeout)


def start_fleetd(book: StateFile, name: str) -> None:
    """Start fleetd again on a running node whose fleetd was stopped or killed."""
    ns = _own_fleetd(book, name)
    if processes.pid_alive(ns.fleetd_pid):
        raise LabError(f"fleetd on {name} is already running (pid {ns.fleetd_pid})")
    processes.start_fleetd(book, ns)


def _own_fleetd(book: StateFile, name: str) -> NodeState:
    state = book.require()
    if state.user_data:
        raise LabError(
            f"fleetd on {name} is the user-data's fleet.service: "
            f"`fleetpy lab shell {name} systemctl --user stop|start fleet.service`"
        )
    return state.node(name)


def _linked_node(book: StateFile, name: str) -> NodeState:
    state = book.require()
    ns = state.node(name)
    if state.network != "netns" or not ns.veth:
        raise LabError("partition/heal need network namespaces; this lab runs on loopback")
    if not processes.pid_alive(ns.pid):
        raise LabError(f"{name} is not running")
    return ns
