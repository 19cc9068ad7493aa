"""What the lab reports: the registry's view (machines, leader) and each part's health and memory."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from pathlib import Path
from typing import Any, TypeVar

from fleetpy.lab import etcd_access
from fleetpy.lab import node as nodes
from fleetpy.lab.metrics import server_alive
from fleetpy.lab.processes import KEY_PREFIX, cgroup_alive, etcd_health_client, etcd_members, pid_alive
from fleetpy.lab.state import EtcdState, LabError, NodeState, State, StateFile
from fleetpy.registry import Registry, StoreError
from fleetpy.registry.connect import EtcdOptions, open_store
from fleetpy.registry.store import NO_CREDENTIALS

T = TypeVar("T")

REGISTER_TIMEOUT = 20.0


def registry(state: State, retry_for: float = 1.0) -> Registry:
    """The lab's registry, with short retries: the lab reports, it does not wait out outages."""
    credentials = NO_CREDENTIALS
    if state.etcd_secrets:
        credentials = etcd_access.credentials(Path(state.etcd_secrets), etcd_access.FLEET, state.etcd_api)
    options = EtcdOptions(
        tuple(state.etcd_urls), credentials=credentials, request_timeout=1.0, retry_for=retry_for
    )
    return Registry(open_store(options, state.etcd_api), KEY_PREFIX)


def read(state: State, call: Callable[[Registry], Awaitable[T]], retry_for: float = 1.0) -> T:
    """`call(registry)` on a registry of its own, in an event loop of its own: the lab is
    synchronous, and an etcd client belongs to the loop it was made in."""

    async def once() -> T:
        lab_registry = registry(state, retry_for)
        try:
            return await call(lab_registry)
        finally:
            await lab_registry.close()

    return asyncio.run(once())


def machines(state: State) -> set[str]:
    """Ids of the machines registered in etcd; empty if etcd does not answer."""
    try:
        return {m.id for m in read(state, lambda r: r.machines())}
    except StoreError:
        return set()


def fleetd_alive(state: State, ns: NodeState) -> bool:
    """Whether the node's fleetd runs: the lab's own process, or a user-data lab's fleet.service."""
    if state.user_data:
        return cgroup_alive(f"{ns.cgroup}/{nodes.MANAGER_CGROUP}/app.slice/fleet.service")
    return pid_alive(ns.fleetd_pid)


def endpoint(book: StateFile) -> str:
    """fleetctl's endpoint for the lab: the first node's API socket."""
    return f"unix://{book.dir / book.require().nodes[0].name / 'fleet.sock'}"


def wait_registered(
    book: StateFile, timeout: float = REGISTER_TIMEOUT, names: list[str] | None = None
) -> None:
    """Wait until every (named) node's fleetd is registered in etcd and serves its API.

    Both, because a restarted fleetd finds its previous record still alive for up to a TTL.
    """
    state = book.require()
    want = {n.machine_id: n for n in state.nodes if names is None or n.name in names}
    deadline = time.monotonic() + timeout
    while True:
        registered = machines(state)
        seen = {
            mid
            for mid, ns in want.items()
            if mid in registered and _api_answers(book.dir / ns.name / "fleet.sock")
        }
        if set(want) <= seen:
            return
        for mid, ns in want.items():
            # fleet.service of a user-data lab restarts by itself; only a lab's own fleetd is final.
            if mid not in seen and not state.user_data and not pid_alive(ns.fleetd_pid):
                raise LabError(f"fleetd on {ns.name} exited:\n{_tail(book.dir / ns.name / 'fleetd.log')}")
        if time.monotonic() > deadline:
            missing = ", ".join(n.name for m, n in want.items() if m not in seen)
            logs = (
                "`fleetpy lab shell NODE journalctl --user-unit fleet.service`"
                if state.user_data
                else f"{book.dir}/NODE/fleetd.log"
            )
            raise LabError(f"machines not registered after {timeout:.0f}s: {missing}; see {logs}")
        time.sleep(0.1)


def status(book: StateFile) -> dict[str, Any]:
    """The lab as `fleetpy lab status --json` shows it."""
    state = book.require()
    registered = machines(state)
    members = [_etcd_row(state, member) for member in state.etcd]
    return {
        "dir": state.dir,
        "network": state.network,
        "containers": state.containers,
        "bridge": state.bridge,
        "user_data": state.user_data,
        "endpoint": endpoint(book),
        # `up --metrics`: every node's metrics for Prometheus, behind the lab's token
        "metrics": state.metrics_url if server_alive(state) else "",
        "etcd": members,
        "etcd_quorum": _quorum(members),
        "nodes": [_node_row(state, ns, registered) for ns in state.nodes],
    }


def _etcd_row(state: State, member: EtcdState) -> dict[str, Any]:
    running = next(m for m in etcd_members(state) if m.name == member.name)
    return {
        "name": member.name,
        "url": member.client_url,
        "running": cgroup_alive(member.cgroup),
        "healthy": running.healthy(etcd_health_client(state)),
    }


def _quorum(members: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether etcd has a quorum: a member is healthy only while it has a leader, which takes a
    majority of the members running."""
    return {
        "ok": any(m["healthy"] for m in members),
        "running": sum(m["running"] for m in members),
        "members": len(members),
        "majority": len(members) // 2 + 1,
    }


def _node_row(state: State, ns: NodeState, registered: set[str]) -> dict[str, Any]:
    rss, pss, procs = _cgroup_memory(ns.cgroup) if ns.cgroup else (0, 0, 0)
    return {
        "name": ns.name,
        "ip": ns.ip,
        "machine_id": ns.machine_id,
        "metadata": ns.metadata,
        "systemd": pid_alive(ns.pid),
        "fleetd": fleetd_alive(state, ns),
        "registered": ns.machine_id in registered,
        "partitioned": ns.partitioned,
        "processes": procs,
        "rss_kib": rss,
        "pss_kib": pss,
    }


def _api_answers(socket_path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(socket_path))
            return True
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
