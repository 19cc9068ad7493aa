"""Simulated machines on one host: a systemd --user manager per node, in its own cgroup and namespaces."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

CGROUP_ROOT = Path("/sys/fs/cgroup")
# Every hierarchy a node's processes must be confined to; "unified" is the
# cgroup2 mount of the hybrid layout and is the one that has cgroup.kill.
CGROUP_HIERARCHIES = ("systemd", "unified", "pids", "memory", "cpu", "cpuacct")
SYSTEMD = "/lib/systemd/systemd"
JOURNALD = "/lib/systemd/systemd-journald"
MANAGER_CGROUP = "user@0.service"
# Volatile and quiet: the node's journal lives in its private /run/log and copies nothing
# from the host (kernel log, audit) nor forwards anything to it.
JOURNALD_CONF = """[Journal]
Storage=volatile
RuntimeMaxUse=16M
ReadKMSG=no
Audit=no
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
"""
START_TIMEOUT = 10.0
KILL_TIMEOUT = 5.0

NAME_RE = re.compile(r"^[a-zA-Z0-9_.-]{1,40}$")
_SPAWN = str(Path(__file__).with_name("_spawn.py"))


class NodeError(RuntimeError):
    """A node could not be started or torn down; the message says why."""


@dataclass
class Node:
    name: str
    dir: Path
    pid: int
    env: dict[str, str]
    ip: str
    cgroup: str
    netns: str | None = None
    veth: str | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def cgroup_dirs(self) -> list[Path]:
        return _cgroup_dirs(self.cgroup)

    def popen(
        self,
        argv: list[str],
        env_extra: dict[str, str] | None = None,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        **kwargs: Any,
    ) -> subprocess.Popen:
        """Run argv inside the node: its mount (and net) namespace, its env, its cgroup."""
        env = {**os.environ, **self.env, **(env_extra or {})}
        return subprocess.Popen(self._enter_argv(argv), env=env, stdout=stdout, stderr=stderr, **kwargs)

    def run(
        self,
        argv: list[str],
        env_extra: dict[str, str] | None = None,
        timeout: float | None = 30.0,
        check: bool = False,
    ) -> subprocess.CompletedProcess:
        """Run argv inside the node and wait; output is captured as text."""
        env = {**os.environ, **self.env, **(env_extra or {})}
        return subprocess.run(
            self._enter_argv(argv),
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def _enter_argv(self, argv: list[str]) -> list[str]:
        if not argv:
            raise ValueError("empty command")
        # The helper joins the node's cgroups before exec'ing nsenter, so the
        # command and all its children die with the node.
        enter = ["nsenter", f"--target={self.pid}", "--mount", "--uts", f"--wd={Path.cwd()}"]
        if self.netns:
            enter.append("--net")
        return [
            sys.executable,
            _SPAWN,
            *_procs_args(self.cgroup),
            "--",
            *enter,
            "--",
            *argv,
        ]

    def kill(self) -> None:
        """Kill every process of the node and remove its cgroups and network namespace."""
        kill_cgroup(self.cgroup, what=f"node {self.name}")
        if self.process is not None:
            self.process.wait(timeout=KILL_TIMEOUT)
        if self.netns:
            _ip("netns", "delete", self.netns, check=False)
        if self.veth and link_exists(self.veth):
            _ip("link", "delete", self.veth, check=False)


def kill_cgroup(cgroup: str, what: str = "") -> None:
    """SIGKILL every process in `cgroup` (all hierarchies, all descendants), then remove it."""
    dirs = [d for d in _cgroup_dirs(cgroup) if d.is_dir()]
    unified = CGROUP_ROOT / "unified" / cgroup
    if (unified / "cgroup.kill").exists():
        (unified / "cgroup.kill").write_text("1")
    deadline = time.monotonic() + KILL_TIMEOUT
    while pids := _cgroup_pids(dirs):
        # Fallback for kernels without cgroup.kill, and for the v1
        # hierarchies: these pids are ours because they are in our cgroup.
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise NodeError(f"{what or cgroup}: processes {sorted(pids)} survived SIGKILL")
        time.sleep(0.02)
    for d in dirs:
        _rmtree_cgroup(d)


def make_cgroup(cgroup: str) -> list[str]:
    """Create `cgroup` in every hierarchy; returns _spawn.py arguments that make a process join it."""
    for d in _cgroup_dirs(cgroup):
        d.mkdir(parents=True, exist_ok=True)
    return [sys.executable, _SPAWN, *_procs_args(cgroup), "--"]


def start_node(
    name: str,
    base_dir: Path,
    ip: str | None = None,
    netns: bool = False,
    bridge: str | None = None,
    on_created: Callable[[Node], None] | None = None,
    journald: bool = True,
) -> Node:
    """Start a node: own cgroups, mount and UTS namespaces, machine-id, runtime dir and systemd --user.

    `on_created` sees the node once its cgroup, netns and veth names are chosen and before any
    of them exists, so a caller can record them and clean up even if this process dies midway.
    With `journald`, the node runs its own systemd-journald (private /run/log) before its manager,
    so `journalctl --user-unit X` inside the node shows the unit's output.
    """
    if not NAME_RE.match(name):
        raise ValueError(f"{name!r}: node names may contain only letters, digits and '_.-' (at most 40)")
    if netns and not (ip and bridge):
        raise ValueError("a node with its own network namespace needs an ip and a bridge")
    _check_host()
    node_dir = Path(base_dir) / name
    run_dir = node_dir / "run"
    home = node_dir / "home"
    # systemd binds sockets such as run/systemd/private: sun_path holds 108 bytes.
    if len(str(run_dir.absolute())) > 80:
        raise ValueError(f"{run_dir}: path too long for the node's D-Bus and systemd sockets")
    for d in (node_dir, run_dir, home):
        d.mkdir(mode=0o755, parents=True, exist_ok=True)
    machine_id = _machine_id(node_dir)

    token = secrets.token_hex(4)
    # A ".slice" top and a "user@0.service" below it make the cgroup paths of the node's units
    # read like a normal user manager's, so journald files their output under _SYSTEMD_USER_UNIT.
    cgroup = f"fleetpy-{name}-{token}.slice"
    manager_cgroup = f"{cgroup}/{MANAGER_CGROUP}"
    env = {
        "XDG_RUNTIME_DIR": str(run_dir),
        "DBUS_SESSION_BUS_ADDRESS": f"unix:path={run_dir / 'bus'}",
        "HOME": str(home),
    }
    node = Node(name=name, dir=node_dir, pid=0, env=env, ip="127.0.0.1", cgroup=cgroup)
    if netns:
        node.netns = f"fleetpy-{name}-{token}"
        node.veth = f"fv{token}"
    if on_created:
        on_created(node)
    try:
        make_cgroup(cgroup)
        prefix: list[str] = []
        if node.netns and node.veth:
            node.ip = _setup_netns(node.netns, node.veth, str(ip), str(bridge))
            prefix = ["nsenter", f"--net=/run/netns/{node.netns}", "--"]
        elif ip:
            node.ip = str(ipaddress.ip_address(ip))
        journal_args: list[str] = []
        if journald:
            conf = node_dir / "journald.conf.d"
            conf.mkdir(exist_ok=True)
            (conf / "fleetpy-lab.conf").write_text(JOURNALD_CONF)
            journal_args = [
                "--mkdir", "/run/systemd/journald.conf.d",
                "--bind", str(conf), "/run/systemd/journald.conf.d",
                "--journald", JOURNALD,
                # journald belongs to the node, not to the manager's cgroup.
                *(a for d in _cgroup_dirs(cgroup) for a in ("--journald-cgroup-procs", str(d / "cgroup.procs"))),
            ]  # fmt: skip
        argv = [
            *make_cgroup(manager_cgroup),
            *prefix, "unshare", "--mount", "--uts", "--propagation", "private", "--",
            sys.executable, _SPAWN, "--hostname", name,
            "--tmpfs", "/run/systemd", "--mkdir", "/run/systemd/system",
            "--bind", str(machine_id), "/etc/machine-id",
            *journal_args,
            "--", SYSTEMD, "--user",
        ]  # fmt: skip
        # A clean environment: the user manager hands its own to every unit.
        manager_env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "USER": "root",
            **env,
        }
        with open(node_dir / "systemd.log", "ab") as log:
            node.process = subprocess.Popen(
                argv,
                env=manager_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd="/",
                # Its own session: a Ctrl-C or hangup of whoever started the node must not reach it.
                start_new_session=True,
            )
        # Every helper in the chain exec's, so this is the manager's own pid.
        node.pid = node.process.pid
        _wait_ready(node)
    except BaseException:
        node.kill()
        raise
    return node


def _setup_netns(netns: str, veth: str, ip: str, bridge: str) -> str:
    iface = ipaddress.ip_interface(ip if "/" in ip else f"{ip}/24")
    if not link_exists(bridge):
        # The bridge is its lab's (lab/network.py): a node never makes one it would not own.
        raise NodeError(f"bridge {bridge} does not exist; its lab creates it before its nodes")
    _ip("netns", "add", netns)
    peer = f"fp{veth[2:]}"
    _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
    _ip("link", "set", veth, "master", bridge)
    _ip("link", "set", veth, "up")
    _ip("link", "set", peer, "netns", netns)
    _ip("-n", netns, "link", "set", peer, "name", "eth0")
    _ip("-n", netns, "addr", "add", str(iface), "dev", "eth0")
    _ip("-n", netns, "link", "set", "eth0", "up")
    _ip("-n", netns, "link", "set", "lo", "up")
    return str(iface.ip)


def _wait_ready(node: Node) -> None:
    assert node.process is not None
    argv = [
        "busctl", "--user", "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
        "org.freedesktop.DBus.Peer", "Ping",
    ]  # fmt: skip
    env = {**os.environ, **node.env}
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if node.process.poll() is not None:
            raise NodeError(
                f"node {node.name}: systemd --user exited ({node.process.returncode}); {_log_tail(node)}"
            )
        bus_up = (node.dir / "run" / "bus").exists()
        if bus_up and subprocess.run(argv, check=False, env=env, capture_output=True).returncode == 0:
            return
        if time.monotonic() > deadline:
            raise NodeError(f"node {node.name}: systemd --user did not answer on D-Bus in {START_TIMEOUT}s")
        time.sleep(0.02)


def _log_tail(node: Node) -> str:
    try:
        return (node.dir / "systemd.log").read_text(errors="replace")[-2000:]
    except OSError:
        return "(no log)"


def _check_host() -> None:
    missing = [tool for tool in ("unshare", "nsenter", "busctl", "ip", "mount") if shutil.which(tool) is None]
    if not os.access(SYSTEMD, os.X_OK):
        missing.append(f"{SYSTEMD} (Debian package systemd)")
    if not Path("/usr/lib/systemd/user/dbus.socket").exists():
        missing.append("dbus.socket for the user manager (Debian package dbus-user-session)")
    if missing:
        raise NodeError("cannot start a lab node, missing: " + ", ".join(missing))
    if os.geteuid() != 0:
        raise NodeError("lab nodes need root (cgroups, mount and network namespaces)")


def _machine_id(node_dir: Path) -> Path:
    path = node_dir / "machine-id"
    if not path.exists():
        path.write_text(secrets.token_hex(16) + "\n")
    return path


def _cgroup_dirs(cgroup: str) -> list[Path]:
    return [CGROUP_ROOT / h / cgroup for h in CGROUP_HIERARCHIES if (CGROUP_ROOT / h).is_dir()]


def _procs_args(cgroup: str) -> list[str]:
    return [arg for d in _cgroup_dirs(cgroup) for arg in ("--cgroup-procs", str(d / "cgroup.procs"))]


def _cgroup_pids(dirs: list[Path]) -> set[int]:
    pids: set[int] = set()
    for top in dirs:
        for procs in top.rglob("cgroup.procs"):
            with contextlib.suppress(FileNotFoundError):
                pids.update(int(line) for line in procs.read_text().split())
    return pids


def _rmtree_cgroup(top: Path) -> None:
    # Only directories can be removed from cgroupfs, and only leaves first.
    for dirpath, _dirnames, _files in os.walk(top, topdown=False):
        deadline = time.monotonic() + KILL_TIMEOUT
        while True:
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError:
                # EBUSY until the kernel has finished tearing down exited tasks.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


def link_exists(name: str) -> bool:
    return (
        subprocess.run(["ip", "link", "show", "dev", name], check=False, capture_output=True).returncode == 0
    )


def _ip(*args: str, check: bool = True) -> None:
    result = subprocess.run(["ip", *args], check=False, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise NodeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
