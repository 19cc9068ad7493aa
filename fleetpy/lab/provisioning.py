"""What a node gets besides its manager: podman for container units, or the lab's user-data.

A node of the lab's own is made ready for container units before its fleetd starts (podman
config, the offline image, crun's cgroups, the example units' host paths). A node of a lab
made from user-data is configured only by applying that file inside it, as a CoreOS machine
applies its user-data at every boot; the lab adds one runtime drop-in for what only a lab
on a shared host needs.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import sys
from pathlib import Path

from fleetpy.lab import etcd_access
from fleetpy.lab.image import ImageError, build_busybox_image, prepare_node, write_podman_config
from fleetpy.lab.node import Node
from fleetpy.lab.processes import API_PORT, REPO_ROOT, pythonpath, shared_volume_dir
from fleetpy.lab.state import LabError, NodeState, StateFile
from fleetpy.unit.quoting import environment, quote_value

LAB_DROP_IN = "50-lab.conf"
# Applying user-data waits for its start jobs; etcd2's ends once a quorum of members runs.
APPLY_TIMEOUT = 60.0
# Host paths the example units use (web-discovery@ reads /etc/fleetpy/discovery.env, db keeps
# its data in /var/lib/fleetpy/db); inside each node a bind mount shows the node's own
# <dir>/NODE/<name> there, as if every node were a machine of its own.
NODE_PATHS = {"etc-fleetpy": Path("/etc/fleetpy"), "var-lib-fleetpy": Path("/var/lib/fleetpy")}


def prepare_containers(book: StateFile, ns: NodeState, node: Node) -> None:
    """Podman config, image, crun cgroups and the example units' host paths for one node."""
    podman_dir = node.dir / "podman"
    podman_reboot(podman_dir)
    env = write_podman_config(podman_dir)
    # `lab shell NODE podman ps` must see the node's containers, as its units do.
    ns.env.update(env)
    book.save()
    try:
        # Per node storage, since container names are per storage; importing takes ~0.2 s
        # and happens once per node dir (the image outlives `down` with the node dir).
        build_busybox_image(podman_env=env)
    except ImageError as error:
        raise LabError(f"{ns.name}: {error}") from None
    for sub in NODE_PATHS:
        (node.dir / sub).mkdir(exist_ok=True)
    try:
        prepare_node(node, env)
        for sub, path in NODE_PATHS.items():
            # The mount point must exist on the host; it stays empty there, the bind
            # mount lives and dies with the node's mount namespace.
            path.mkdir(parents=True, exist_ok=True)
            node.run(["mount", "--bind", str(node.dir / sub), str(path)], check=True)
    except subprocess.CalledProcessError as error:
        raise LabError(f"{ns.name}: {' '.join(error.cmd)}: {(error.stderr or '').strip()}") from None


def write_discovery_env(book: StateFile, ns: NodeState) -> None:
    """The example sidekicks' etcd settings in the node's /etc/fleetpy, once the lab's etcd runs
    (its URL and credentials exist only then)."""
    state = book.require()
    etc = book.dir / ns.name / "etc-fleetpy"
    access = []
    if state.etcd_secrets:
        access = etcd_access.discovery_env(Path(state.etcd_secrets), etc, NODE_PATHS["etc-fleetpy"])
    lines = [
        f"ETCD_ENDPOINT={state.etcd_urls[0]}",
        *access,
        f"ANNOUNCE_ADDRESS={ns.ip}",
        # The sidekick runs the host's python3; fleetpy may be a checkout, not installed.
        f"PYTHONPATH={REPO_ROOT}",
    ]
    (etc / "discovery.env").write_text("\n".join(lines) + "\n")


def forget_containers(book: StateFile) -> list[str]:
    """Remove the container records of every (dead) node's podman; returns what failed, per node."""
    nodes = book.require().nodes
    with concurrent.futures.ThreadPoolExecutor(len(nodes)) as pool:
        results = pool.map(lambda ns: _forget_containers(book.dir / ns.name / "podman"), nodes)
        return [f"{ns.name}: {error}" for ns, error in zip(nodes, results, strict=True) if error]


def podman_reboot(podman_dir: Path) -> None:
    """What a reboot does to podman: its runtime state and its tmp dir (where it notices reboots)
    start empty, or it would trust the states of containers that died with their node."""
    for sub in ("run", "tmp"):
        shutil.rmtree(podman_dir / sub, ignore_errors=True)


def provision(book: StateFile, targets: list[NodeState]) -> list[str]:
    """Apply the lab's user-data inside each node, all at once; returns a note per node.

    All at once, because a static etcd2 member becomes ready (and its start job ends) only
    when a quorum of its peers runs.
    """
    with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
        return list(pool.map(lambda ns: _apply_user_data(book, ns), targets))


def lab_drop_in(book: StateFile, ns: NodeState) -> str:
    """fleet.service settings only a lab needs: this fleetpy, and per-node paths on a shared host."""
    state = book.require()
    node_dir = book.dir / ns.name
    env = {
        # The user-data's ExecStart names where a machine installs fleetd; here it is this venv.
        "PYTHONPATH": pythonpath(),
        "FLEET_CONFIG": str(node_dir / "root" / "etc" / "fleet" / "fleet.conf"),
        "FLEET_SYSTEMD_BUS": "user",
        # Host paths that every node would otherwise share.
        "FLEET_UNIT_DIR": str(node_dir / "units"),
        "FLEET_VOLUME_DIR": str(node_dir / "volumes"),
        # What every node shares, as every machine mounts the same NFS.
        "FLEET_SHARED_VOLUME_DIR": str(shared_volume_dir(book)),
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


def _apply_user_data(book: StateFile, ns: NodeState) -> str:
    state = book.require()
    node = book.node(ns)
    # Runtime, so it is the lab's and not part of the machine's configuration: systemd
    # reads drop-ins from $XDG_RUNTIME_DIR/systemd/user too, after 20-cloudinit.conf.
    drop_in = node.dir / "run" / "systemd" / "user" / "fleet.service.d" / LAB_DROP_IN
    drop_in.parent.mkdir(parents=True, exist_ok=True)
    drop_in.write_text(lab_drop_in(book, ns))
    root = node.dir / "root"
    root.mkdir(exist_ok=True)
    argv = [
        sys.executable, "-m", "fleetpy.cli.fleetpy", "cloud-config", "apply", state.user_data,
        "--root", str(root), "--systemd-bus", "user",
        "--private-ipv4", ns.ip, "--public-ipv4", ns.ip,
    ]  # fmt: skip
    try:
        result = node.run(argv, env_extra={"PYTHONPATH": pythonpath()}, timeout=APPLY_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise LabError(f"{ns.name}: applying {state.user_data} took over {APPLY_TIMEOUT:.0f}s") from None
    with open(node.dir / "user-data.log", "a") as log:
        log.write(result.stdout + result.stderr)
    if result.returncode != 0:
        raise LabError(
            f"{ns.name}: cloud-config apply {state.user_data} failed:\n{(result.stdout + result.stderr)[-2000:]}"
        )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "?"
    return f"{ns.name}: user-data applied: {summary}"


def _forget_containers(podman_dir: Path) -> str | None:
    """Remove every container record of a dead node's podman storage; returns podman's error."""
    if not (podman_dir / "containers.conf").exists():
        return None
    podman_reboot(podman_dir)
    env = {**os.environ, **write_podman_config(podman_dir)}
    result = subprocess.run(
        ["podman", "rm", "--all", "--force"], env=env, capture_output=True, text=True, check=False
    )
    return None if result.returncode == 0 else f"podman rm --all: {result.stderr.strip()}"
