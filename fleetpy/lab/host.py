"""What the host must offer the lab, checked before anything is made."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

from fleetpy.lab import node as nodes
from fleetpy.lab.image import BUSYBOX
from fleetpy.lab.state import LabError


def check_host() -> None:
    """Fail early, saying what to install, rather than halfway through `up`."""
    problems = []
    if os.geteuid() != 0:
        problems.append("the lab needs root (cgroups, mount and network namespaces): run it with sudo")
    if shutil.which("etcd") is None or shutil.which("etcdctl") is None:
        problems.append("no etcd or etcdctl binary: apt-get install -y etcd-server etcd-client")
    if shutil.which("openssl") is None:
        problems.append("no openssl (the lab's etcd wants TLS): apt-get install -y openssl")
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


def choose_containers(containers: bool | None, notes: list[str]) -> bool:
    """Whether nodes get podman: as asked, or (None) when the host has what it needs."""
    missing = missing_for_containers()
    if containers is False:
        return False
    if missing is None:
        return True
    if containers:
        raise LabError(f"--containers: {missing}")
    notes.append(f"containers: off ({missing}); plain units still work")
    return False


def choose_network(network: str, notes: list[str]) -> str:
    """ "netns" when network namespaces can be made (or are asked for), else "loopback"."""
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
