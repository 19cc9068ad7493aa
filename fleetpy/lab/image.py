"""The offline lab image: a busybox rootfs imported into podman, and the podman config that works here.

No test or lab run may need a registry, so the image is built from the host's
busybox-static binary. The config files pin podman to what this host supports
(see HOST-NOTES): cgroupfs, file events, crun, and private storage/tmp paths.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from fleetpy.lab.node import Node

DEFAULT_IMAGE = "localhost/fleetpy-busybox"
BUSYBOX = "/bin/busybox"
CGROUP2 = Path("/sys/fs/cgroup/unified")
# Applets the lab units use; busybox dispatches on argv[0], so symlinks suffice.
APPLETS = (
    "sh", "httpd", "wget", "sleep", "echo", "cat", "ls", "mkdir", "printf",
    "nc", "hostname", "env", "true", "false", "id", "ps", "kill",
)  # fmt: skip


class ImageError(RuntimeError):
    """podman could not build or inspect the lab image; the message carries its stderr."""


def write_podman_config(directory: Path, runtime: str = "crun") -> dict[str, str]:
    """Write containers.conf and storage.conf under `directory`; return the env that selects them.

    Everything podman keeps (images, containers, runtime state, events, tmp)
    lives under `directory`, so a lab run never touches the host's
    /var/lib/containers and one directory per node keeps nodes apart.
    """
    directory = Path(directory).absolute()
    for sub in ("graph", "run", "tmp"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    containers_conf = directory / "containers.conf"
    storage_conf = directory / "storage.conf"
    containers_conf.write_text(
        "[engine]\n"
        # No systemd as PID 1 here: the systemd cgroup manager has nobody to talk to.
        'cgroup_manager = "cgroupfs"\n'
        # journald is not running either.
        'events_logger = "file"\n'
        f'events_logfile_path = "{directory / "events.log"}"\n'
        f'tmp_dir = "{directory / "tmp"}"\n'
        f'runtime = "{runtime}"\n'
    )
    storage_conf.write_text(
        "[storage]\n"
        'driver = "overlay"\n'
        f'graphroot = "{directory / "graph"}"\n'
        f'runroot = "{directory / "run"}"\n'
        "[storage.options.overlay]\n"
        # Otherwise the first podman command bind-mounts graph/overlay onto itself in the
        # caller's mount namespace, and outside a node that mount outlives the lab.
        'skip_mount_home = "true"\n'
    )
    return {"CONTAINERS_CONF": str(containers_conf), "CONTAINERS_STORAGE_CONF": str(storage_conf)}


def image_exists(name: str, podman_env: dict[str, str] | None = None) -> bool:
    result = subprocess.run(
        ["podman", "image", "exists", name],
        env={**os.environ, **(podman_env or {})},
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


def build_busybox_image(name: str = DEFAULT_IMAGE, podman_env: dict[str, str] | None = None) -> str:
    """Import a busybox rootfs as image `name` unless it already exists; return `name`."""
    if image_exists(name, podman_env):
        return name
    if not os.access(BUSYBOX, os.X_OK):
        raise ImageError(f"{BUSYBOX} is missing; install the Debian package busybox-static")
    with tempfile.TemporaryDirectory(prefix="fleetpy-image-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        for sub in ("bin", "etc", "tmp", "www", "proc", "sys", "dev"):
            (rootfs / sub).mkdir(parents=True)
        shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
        for applet in APPLETS:
            (rootfs / "bin" / applet).symlink_to("busybox")
        # httpd and id look users up; without these files they log noise.
        (rootfs / "etc" / "passwd").write_text(
            "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
        )
        (rootfs / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
        (rootfs / "www" / "index.html").write_text("fleetpy busybox\n")
        tar_path = Path(tmp) / "rootfs.tar"
        with tarfile.open(tar_path, "w") as tar:
            tar.add(rootfs, arcname=".")
        result = subprocess.run(
            [
                "podman",
                "import",
                "--change",
                'CMD ["/bin/sh"]',
                "--change",
                "ENV PATH=/bin",
                str(tar_path),
                name,
            ],
            env={**os.environ, **(podman_env or {})},
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        raise ImageError(f"podman import {name} failed: {result.stderr.strip()}")
    return name


def prepare_node(node: Node, podman_env: dict[str, str]) -> None:
    """Make rootful podman with crun work for units of a lab node.

    crun refuses the hybrid cgroup layout while controllers sit on cgroup2
    ("drop all controllers from cgroupv2"); here hugetlb does. Mounting a v1
    hierarchy for each such controller, inside the node's mount namespace,
    moves it off cgroup2 for as long as the node lives (the kernel hands it
    back once the last mount is gone, so every node mounts it: the node that
    mounted it first may die before the others). Unmounting /sys/fs/cgroup/unified
    instead breaks the node's systemd (status 219/CGROUP); runc rejects
    --cgroups=disabled. The podman config goes into the manager's
    environment, so every unit of the node inherits it.
    """
    for controller in cgroup2_controllers():
        mountpoint = node.dir / f"cgroup-{controller}"
        mountpoint.mkdir(exist_ok=True)
        node.run(
            ["mount", "-t", "cgroup", "-o", controller, f"fleetpy-{controller}", str(mountpoint)], check=True
        )
    assignments = [f"{key}={value}" for key, value in podman_env.items()]
    node.run(["systemctl", "--user", "set-environment", *assignments], check=True)


def cgroup2_controllers() -> list[str]:
    """Controllers the host leaves on cgroup2, including those a running node has moved to v1.

    Seen from the host's mount namespace: a controller is on cgroup2 now, or it has a v1
    hierarchy (/proc/cgroups) that no host mount shows, i.e. only some node mounted it.
    """
    on_cgroup2 = set((CGROUP2 / "cgroup.controllers").read_text().split())
    host_v1: set[str] = set()
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[2] == "cgroup":
            host_v1.update(fields[3].split(","))
    moved = set()
    for line in Path("/proc/cgroups").read_text().splitlines()[1:]:
        name, hierarchy, _count, enabled = line.split()
        if enabled == "1" and hierarchy != "0" and name not in host_v1:
            moved.add(name)
    return sorted(on_cgroup2 | moved)
