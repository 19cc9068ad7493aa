"""Apply cloud-config user-data to a machine: files, hostname, SSH keys, users, etcd2, fleet and units.

The work is split the way fleet's agent splits it: `plan()` (plan.py) turns the parsed
user-data into a list of file and link changes plus unit commands (it reads the target tree
but never writes), every path is checked against the tree it must stay in, and only then
does `execute()` (execute.py) write -- so bad user-data or an escaping path changes nothing.
This module finds the target and the addresses and runs the two.

Where things go (ROOT is --root, default /):

- write_files: ROOT/PATH; hostname: ROOT/etc/hostname (and the live hostname if ROOT is /);
  ssh_authorized_keys: ROOT/root/.ssh/authorized_keys, merged with the keys already there.
- coreos.etcd2: UNITDIR/etcd2.service.d/20-cloudinit.conf with one
  Environment="ETCD_<OPTION>=value" per option, as coreos-cloudinit wrote it, plus an
  etcd2.service (templates/etcd2.service.j2) that runs Debian's /usr/bin/etcd (package etcd-server) with those variables.
  We name it etcd2.service rather than reuse Debian's etcd.service so that the CoreOS drop-in
  path is the one that configures it; it conflicts with etcd.service (same ports).
- coreos.fleet: ROOT/etc/fleet/fleet.conf (what fleetd reads) and the same options as
  FLEET_* variables in UNITDIR/fleet.service.d/20-cloudinit.conf.
  UNITDIR is the unit directory of the chosen manager, as for coreos.units below.
- coreos.units: into the unit directory of the manager chosen by --systemd-bus:
  system: ROOT/etc/systemd/system (runtime: ROOT/run/systemd/system);
  user or a bus address: the user manager's own $XDG_CONFIG_HOME/systemd/user (default
  $HOME/.config/systemd/user; runtime: $XDG_RUNTIME_DIR/systemd/user), read from the
  manager's environment over D-Bus. Those directories belong to the manager, so they are
  not placed under ROOT.
  `enable` makes the [Install] symlinks itself, as `systemctl enable` does, so it also works
  under --root; `command` runs over D-Bus after a daemon Reload.

Values in Environment= lines are not escaped for '%', so systemd specifiers such as %H and
%m work in coreos.etcd2 and coreos.fleet options, as they did with coreos-cloudinit.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import os
import re
import socket
import struct
from pathlib import Path

from fleetpy.cloudinit.execute import Echo, execute
from fleetpy.cloudinit.model import CloudConfig, load
from fleetpy.cloudinit.plan import ApplyError, Target, plan
from fleetpy.cloudinit.substitute import substitute
from fleetpy.systemd import SystemdBus, SystemdError

__all__ = ["ApplyError", "apply_user_data", "detect_ipv4", "prepare", "target_for"]

_SIOCGIFADDR = 0x8915
_VARIABLE = re.compile(r"(?<!\\)\$(private_ipv4|public_ipv4)")


def apply_user_data(
    text: str,
    root: Path = Path("/"),
    bus: str = "system",
    private_ipv4: str | None = None,
    public_ipv4: str | None = None,
    dry_run: bool = False,
    run_commands: bool = True,
    echo: Echo = print,
) -> int:
    """Validate and apply user-data `text`; returns how many changes were made (or would be)."""
    if _VARIABLE.search(text) and (private_ipv4 is None or public_ipv4 is None):
        detected = detect_ipv4()
        private_ipv4 = private_ipv4 or detected
        public_ipv4 = public_ipv4 or detected
    config = prepare(text, private_ipv4, public_ipv4)
    target = target_for(root, bus, run_commands and not dry_run)
    return execute(plan(config, target), target, dry_run, echo)


def detect_ipv4() -> str | None:
    """The first non-loopback IPv4 address of this machine's interfaces, by interface index.

    Reads the kernel's interface addresses with an ioctl; the socket is never used to send.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _index, name in sorted(socket.if_nameindex()):
            try:
                reply = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on this interface
            address = ipaddress.IPv4Address(reply[20:24])
            if not address.is_loopback:
                return str(address)
    return None


def prepare(text: str, private_ipv4: str | None, public_ipv4: str | None) -> CloudConfig:
    """Validate, substitute the address variables and parse; raises CloudConfigError or ApplyError."""
    # Validate the text as written first so findings point at the user's own lines.
    config = load(text)
    if _VARIABLE.search(text) is None:
        return config
    substituted = substitute(text, private_ipv4, public_ipv4)
    if missing := sorted({m.group(1) for m in _VARIABLE.finditer(substituted)}):
        raise ApplyError(
            f"the user-data uses ${', $'.join(missing)} but no address was given or found; "
            "pass --private-ipv4/--public-ipv4"
        )
    return load(substituted)


def target_for(root: Path, bus: str, run_commands: bool) -> Target:
    """Work out the unit directories for `bus`; a user manager is asked where it reads units."""
    root = Path(os.path.realpath(root))
    if bus == "system":
        return Target(root, bus, root / "etc/systemd/system", root / "run/systemd/system", run_commands)
    env = asyncio.run(_manager_environment(bus))
    home = env.get("HOME")
    config_home = env.get("XDG_CONFIG_HOME") or (f"{home}/.config" if home else None)
    runtime = env.get("XDG_RUNTIME_DIR")
    if not config_home or not runtime:
        raise ApplyError(f"the user manager on {bus} has no HOME/XDG_CONFIG_HOME or XDG_RUNTIME_DIR")
    return Target(root, bus, Path(config_home) / "systemd/user", Path(runtime) / "systemd/user", run_commands)


async def _manager_environment(bus: str) -> dict[str, str]:
    try:
        manager = await SystemdBus.connect(bus)
    except SystemdError as err:
        raise ApplyError(f"cannot ask the user manager where its unit files go: {err}") from err
    try:
        return await manager.environment()
    finally:
        await manager.close()
