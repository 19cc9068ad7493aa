"""Apply cloud-config user-data to a machine: files, hostname, SSH keys, users, etcd2, fleet and units.

The work is split the way fleet's agent splits it: `plan()` turns the parsed user-data into
a list of file and link changes plus unit commands (it reads the target tree but never
writes), every path is checked against the tree it must stay in, and only then does
`execute()` write -- so bad user-data or an escaping path changes nothing.

Where things go (ROOT is --root, default /):

- write_files: ROOT/PATH; hostname: ROOT/etc/hostname (and the live hostname if ROOT is /);
  ssh_authorized_keys: ROOT/root/.ssh/authorized_keys, merged with the keys already there.
- coreos.etcd2: UNITDIR/etcd2.service.d/20-cloudinit.conf with one
  Environment="ETCD_<OPTION>=value" per option, as coreos-cloudinit wrote it, plus an
  etcd2.service that runs Debian's /usr/bin/etcd (package etcd-server) with those variables.
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
import stat
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetpy.cloudinit.model import CloudConfig, Unit, load
from fleetpy.cloudinit.substitute import substitute
from fleetpy.conf.files import write_atomic
from fleetpy.systemd import SystemdBus, SystemdError
from fleetpy.unit.errors import InvalidUnitFile
from fleetpy.unit.file import UnitFile
from fleetpy.unit.quoting import environment

DROP_IN = "20-cloudinit.conf"
# coreos.units `command` values and the manager methods that carry them out.
JOB_METHODS = {
    "start": "StartUnit",
    "stop": "StopUnit",
    "restart": "RestartUnit",
    "reload": "ReloadUnit",
    "try-restart": "TryRestartUnit",
    "reload-or-restart": "ReloadOrRestartUnit",
    "reload-or-try-restart": "ReloadOrTryRestartUnit",
}
JOB_TIMEOUT = 90.0
ETCD_UNIT = "etcd2.service"
FLEET_UNIT = "fleet.service"
# The options our fleetd reads from fleet.conf (fleetpy.fleetd.config); the other
# coreos.fleet keys are valid for CoreOS fleet but would make our fleetd refuse the file.
FLEETD_OPTIONS = (
    "etcd_servers",
    "etcd_key_prefix",
    "etcd_cafile",
    "etcd_certfile",
    "etcd_keyfile",
    "etcd_request_timeout",
    "public_ip",
    "metadata",
    "agent_ttl",
    "engine_reconcile_interval",
    "disable_engine",
    "verbosity",
)
_SIOCGIFADDR = 0x8915
_VARIABLE = re.compile(r"(?<!\\)\$(private_ipv4|public_ipv4)")

Echo = Callable[[str], None]


class ApplyError(RuntimeError):
    """The user-data cannot be applied to this target; nothing was changed."""


@dataclass(frozen=True)
class Target:
    """Where the user-data goes and what may be done to the running system."""

    root: Path
    bus: str
    unit_dir: Path
    runtime_unit_dir: Path
    # False for --no-commands and --dry-run: no D-Bus calls that change anything.
    run_commands: bool

    @property
    def live(self) -> bool:
        """True when the files land where the chosen manager reads them, so commands make sense."""
        return self.bus != "system" or self.root == Path("/")


@dataclass(frozen=True)
class FileChange:
    path: Path
    content: bytes
    mode: int = 0o644
    uid: int | None = None
    gid: int | None = None
    # Mode for parent directories we create (~/.ssh must not be group-readable).
    dir_mode: int = 0o755


@dataclass(frozen=True)
class LinkChange:
    path: Path
    target: str


@dataclass
class Plan:
    changes: list[FileChange | LinkChange] = field(default_factory=list)
    commands: list[tuple[str, str]] = field(default_factory=list)  # (command, unit name)
    notes: list[str] = field(default_factory=list)
    hostname: str | None = None
    users: list[dict[str, Any]] = field(default_factory=list)


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


def plan(config: CloudConfig, target: Target) -> Plan:
    """Everything applying `config` to `target` would do; reads the target but changes nothing."""
    result = Plan()
    root = target.root
    for wf in config.write_files:
        try:
            content = wf.decoded()
        except ValueError as err:
            raise ApplyError(f"write_files {wf.path}: {err}") from err
        uid, gid = _owner(root, wf.owner)
        mode = wf.permissions if wf.permissions is not None else 0o644
        result.changes.append(FileChange(_inside(root, wf.path), content, mode, uid, gid))
    if config.hostname:
        result.changes.append(FileChange(_inside(root, "/etc/hostname"), f"{config.hostname}\n".encode()))
        result.hostname = config.hostname
    if config.ssh_authorized_keys:
        keys = _inside(root, "/root/.ssh/authorized_keys")
        result.changes.append(
            FileChange(keys, _merge_keys(keys, config.ssh_authorized_keys), 0o600, dir_mode=0o700)
        )
    if config.users:
        names = ", ".join(u["name"] for u in config.users)
        if root == Path("/"):
            result.users = list(config.users)
        else:
            result.notes.append(
                f"users: not created ({names}): --root is not /, users are made on the running system only"
            )
    # etcd2.service and the drop-ins go where the chosen manager reads units (under ROOT for
    # the system manager, the user manager's own dir otherwise), so its commands can start them.
    if config.etcd2:
        result.changes += [
            FileChange(_inside(target.unit_dir, ETCD_UNIT), _etcd_unit(target.bus)),
            FileChange(
                _inside(target.unit_dir, f"{ETCD_UNIT}.d/{DROP_IN}"),
                _environment_drop_in("ETCD", config.etcd2),
            ),
        ]
    if config.fleet:
        options = {k: v for k, v in config.fleet.items() if k in FLEETD_OPTIONS}
        if skipped := sorted(set(config.fleet) - set(options)):
            result.notes.append(f"fleet: options fleetd does not read, left out: {', '.join(skipped)}")
        result.changes += [
            FileChange(_inside(root, "/etc/fleet/fleet.conf"), _fleet_conf(options)),
            FileChange(
                _inside(target.unit_dir, f"{FLEET_UNIT}.d/{DROP_IN}"), _environment_drop_in("FLEET", options)
            ),
        ]
    for unit in config.units:
        _plan_unit(unit, target, result)
    if result.commands and not target.live:
        result.notes.append("units: commands not run: --root is not / and the system manager reads /")
        result.commands = []
    return result


def execute(plan: Plan, target: Target, dry_run: bool, echo: Echo) -> int:  # noqa: C901 - to be split (issue 12)
    """Carry out `plan`, printing a line per action; returns the number of changes made."""
    changed = 0
    unit_dirs = (target.unit_dir, target.runtime_unit_dir)
    units_changed = False
    for change in plan.changes:
        state = _file_state(change) if isinstance(change, FileChange) else _link_state(change)
        what = change.path if isinstance(change, FileChange) else f"{change.path} -> {change.target}"
        if state == "unchanged":
            echo(f"unchanged {what}")
            continue
        changed += 1
        units_changed |= any(d in change.path.parents for d in unit_dirs)
        if dry_run:
            echo(f"would {'create' if state == 'new' else 'update'} {what}")
            continue
        if isinstance(change, FileChange):
            _write(change)
        else:
            _link(change)
        echo(f"{'created' if state == 'new' else 'updated'} {what}")
    for note in plan.notes:
        echo(note)
    if plan.hostname and target.root == Path("/") and socket.gethostname() != plan.hostname:
        changed += 1
        if dry_run:
            echo(f"would set hostname {plan.hostname}")
        else:
            socket.sethostname(plan.hostname)
            echo(f"set hostname {plan.hostname}")
    for user in plan.users:
        changed += _apply_user(user, dry_run, echo)
    if plan.commands or units_changed:
        if not target.run_commands:
            for command, name in plan.commands:
                echo(
                    f"would run {command} {name}" if dry_run else f"skipped {command} {name} (--no-commands)"
                )
        elif target.live:
            changed += asyncio.run(_run_commands(target.bus, plan.commands, units_changed, echo))
    return changed


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


# --- planning helpers -------------------------------------------------------------------


def _inside(base: Path, path: str, link: bool = False) -> Path:
    """base/path, refused unless it stays inside base once '..' and symlinks are resolved.

    For a `link` we make, the last component is replaced rather than followed.
    """
    candidate = base / path.lstrip("/")
    real = Path(os.path.realpath(candidate.parent if link else candidate))
    if real != base and base not in real.parents:
        raise ApplyError(f"{path}: resolves to {real}, outside {base}")
    return candidate


def _plan_unit(unit: Unit, target: Target, result: Plan) -> None:
    unit_dir = target.runtime_unit_dir if unit.runtime else target.unit_dir
    # Unit names were validated, so NAME and NAME.d/DROPIN cannot climb out; symlinks still can.
    # The unit file itself is replaced, never written through, so a masking symlink may be there.
    path = _inside(unit_dir, unit.name, link=True)
    if unit.mask:
        result.changes.append(LinkChange(path, "/dev/null"))
        if unit.content is not None or unit.enable:
            result.notes.append(f"{unit.name}: masked, so its content and enable are ignored")
    elif unit.content is not None:
        result.changes.append(FileChange(path, unit.content.encode()))
    for drop_in in unit.drop_ins:
        result.changes.append(
            FileChange(_inside(unit_dir, f"{unit.name}.d/{drop_in.name}"), drop_in.content.encode())
        )
    if unit.enable and not unit.mask:
        result.changes += _install_links(unit, path, unit_dir, target.root, result.changes, result.notes)
    if unit.command:
        result.commands.append((unit.command, unit.name))


def _install_links(
    unit: Unit,
    path: Path,
    unit_dir: Path,
    root: Path,
    planned_changes: list[FileChange | LinkChange],
    notes: list[str],
) -> list[LinkChange]:
    """The symlinks `systemctl enable` would make from the unit's [Install] section."""
    # Links point where the unit is on the target system, like `systemctl --root` makes them.
    link_target = "/" + str(path.relative_to(root)) if root in path.parents else str(path)
    text = unit.content
    if text is None:
        # The unit may be one this same apply writes, such as etcd2.service.
        planned = [c.content for c in planned_changes if isinstance(c, FileChange) and c.path == path]
        try:
            text = planned[-1].decode() if planned else path.read_text()
        except OSError:
            notes.append(f"{unit.name}: enable needs the unit's content, and {path} is not readable")
            return []
    try:
        install = UnitFile.parse(text)
    except InvalidUnitFile as err:
        raise ApplyError(f"{unit.name}: cannot read [Install]: {err}") from err
    links = [
        LinkChange(_inside(unit_dir, f"{wanting}.{kind}/{unit.name}", link=True), link_target)
        for option, kind in (("WantedBy", "wants"), ("RequiredBy", "requires"))
        for value in install.values("Install", option)
        for wanting in value.split()
    ]
    links += [
        LinkChange(_inside(unit_dir, alias, link=True), link_target)
        for value in install.values("Install", "Alias")
        for alias in value.split()
    ]
    if not links:
        notes.append(f"{unit.name}: no WantedBy=, RequiredBy= or Alias= in [Install]; nothing to enable")
    return links


def _owner(root: Path, owner: str | None) -> tuple[int | None, int | None]:
    """uid and gid for "user[:group]", looked up in the target's own passwd and group files."""
    if not owner:
        return None, None
    user, _, group = owner.partition(":")
    uid, user_gid = _lookup(root / "etc/passwd", user, 2, 3)
    gid = _lookup(root / "etc/group", group, 2, 2)[0] if group else user_gid
    return uid, gid


def _lookup(table: Path, name: str, id_field: int, gid_field: int) -> tuple[int, int]:
    if name.isdigit():
        return int(name), int(name)
    try:
        lines = table.read_text().splitlines()
    except OSError as err:
        raise ApplyError(f"owner {name!r}: cannot read {table}: {err.strerror}") from err
    for line in lines:
        fields = line.split(":")
        if len(fields) > max(id_field, gid_field) and fields[0] == name:
            return int(fields[id_field]), int(fields[gid_field])
    raise ApplyError(f"owner {name!r}: not in {table}")


def _merge_keys(path: Path, keys: list[str]) -> bytes:
    """The authorized_keys file with `keys` appended unless an identical line is already there."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        lines = []
    present = {line.strip() for line in lines}
    lines += [key.strip() for key in keys if key.strip() not in present]
    return ("\n".join(lines) + "\n").encode()


def _systemd_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _environment_drop_in(prefix: str, options: dict[str, Any]) -> bytes:
    # Specifiers stay: user-data writes `name: %H` for systemd to expand, as on CoreOS.
    lines = ["[Service]"]
    lines += [
        environment(f"{prefix}_{key.upper()}", _systemd_value(value), specifiers=True)
        for key, value in options.items()
    ]
    return ("\n".join(lines) + "\n").encode()


def _fleet_conf(options: dict[str, Any]) -> bytes:
    lines = ["# Written by fleetpy cloud-config apply from coreos.fleet"]
    for key, value in options.items():
        if key == "etcd_servers":
            urls = [u.strip() for u in str(value).split(",") if u.strip()]
            lines.append(f"{key}=[{','.join(_quoted(u) for u in urls)}]")
        elif isinstance(value, bool):
            lines.append(f"{key}={str(value).lower()}")
        elif isinstance(value, int | float):
            lines.append(f"{key}={value}")
        else:
            lines.append(f"{key}={_quoted(str(value))}")
    return ("\n".join(lines) + "\n").encode()


def _quoted(text: str) -> str:
    # fleetd reads quoted values with shlex: only backslash and '"' need escaping.
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _etcd_unit(bus: str) -> bytes:
    target = "multi-user.target" if bus == "system" else "default.target"
    return f"""\
# Written by fleetpy cloud-config apply: etcd from Debian's etcd-server package, configured
# by the ETCD_* variables of {ETCD_UNIT}.d/{DROP_IN} (from coreos.etcd2).
[Unit]
Description=etcd2 key-value store (configured by cloud-config)
Conflicts=etcd.service
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
# %S is /var/lib for the system manager and ~/.config for a user manager.
Environment=ETCD_DATA_DIR=%S/etcd2
# fleetpy's registry uses etcd's v2 API, which etcd 3.4 serves only when asked.
Environment=ETCD_ENABLE_V2=true
ExecStart=/usr/bin/etcd
Restart=always
RestartSec=10s
LimitNOFILE=40000

[Install]
WantedBy={target}
""".encode()


# --- execution helpers ------------------------------------------------------------------


def _file_state(change: FileChange) -> str:
    try:
        st = os.lstat(change.path)
    except FileNotFoundError:
        return "new"
    if not stat.S_ISREG(st.st_mode):
        return "changed"
    same_owner = (change.uid is None or st.st_uid == change.uid) and (
        change.gid is None or st.st_gid == change.gid
    )
    if stat.S_IMODE(st.st_mode) != change.mode or not same_owner:
        return "changed"
    return "unchanged" if change.path.read_bytes() == change.content else "changed"


def _link_state(change: LinkChange) -> str:
    if change.path.is_symlink():
        return "unchanged" if os.readlink(change.path) == change.target else "changed"
    return "changed" if change.path.exists() else "new"


def _write(change: FileChange) -> None:
    _make_dirs(change.path.parent, change.dir_mode)
    write_atomic(change.path, change.content, change.mode, change.uid, change.gid)


def _link(change: LinkChange) -> None:
    _make_dirs(change.path.parent, 0o755)
    tmp = change.path.with_name(f".{change.path.name}.link~")
    tmp.unlink(missing_ok=True)
    os.symlink(change.target, tmp)
    os.replace(tmp, change.path)


def _make_dirs(path: Path, mode: int) -> None:
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir()
        os.chmod(directory, mode)  # mkdir's mode is filtered by the umask


def _apply_user(user: dict[str, Any], dry_run: bool, echo: Echo) -> int:
    name = user["name"]
    exists = subprocess.run(["getent", "passwd", name], capture_output=True, check=False).returncode == 0
    if exists:
        echo(f"unchanged user {name} (exists)")
        return 0
    if dry_run:
        echo(f"would create user {name}")
        return 1
    argv = ["useradd"]
    for key, flag in (
        ("gecos", "--comment"),
        ("homedir", "--home-dir"),
        ("primary_group", "--gid"),
        ("shell", "--shell"),
        ("passwd", "--password"),
    ):
        if user.get(key):
            argv += [flag, str(user[key])]
    if user.get("groups"):
        argv += ["--groups", ",".join(user["groups"])]
    for key, flag in (
        ("no_user_group", "--no-user-group"),
        ("system", "--system"),
        ("no_log_init", "--no-log-init"),
    ):
        if user.get(key):
            argv.append(flag)
    argv.append("--no-create-home" if user.get("no_create_home") else "--create-home")
    result = subprocess.run([*argv, name], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ApplyError(f"user {name}: useradd failed: {result.stderr.strip()}")
    echo(f"created user {name}")
    if keys := user.get("ssh_authorized_keys"):
        home = Path(
            subprocess.run(
                ["getent", "passwd", name], capture_output=True, text=True, check=True
            ).stdout.split(":")[5]
        )
        uid = int(subprocess.run(["id", "-u", name], capture_output=True, text=True, check=True).stdout)
        gid = int(subprocess.run(["id", "-g", name], capture_output=True, text=True, check=True).stdout)
        path = home / ".ssh/authorized_keys"
        _write(FileChange(path, _merge_keys(path, keys), 0o600, uid, gid, dir_mode=0o700))
        os.chown(path.parent, uid, gid)
        echo(f"created {path}")
    return 1


async def _manager_environment(bus: str) -> dict[str, str]:
    try:
        manager = await SystemdBus.connect(bus)
    except SystemdError as err:
        raise ApplyError(f"cannot ask the user manager where its unit files go: {err}") from err
    try:
        return await manager.environment()
    finally:
        await manager.close()


async def _run_commands(bus: str, commands: list[tuple[str, str]], reload: bool, echo: Echo) -> int:
    try:
        manager = await SystemdBus.connect(bus)
    except SystemdError as err:
        raise ApplyError(str(err)) from err
    changed = 0
    try:
        # Reload first so that new or changed unit files are what the commands act on.
        await manager.reload()
        echo(f"reloaded systemd ({bus})")
        for command, name in commands:
            # Starting an active unit, or stopping an inactive one, is a no-op for systemd; say
            # so, to keep re-runs quiet.
            if command in ("start", "stop"):
                state = (await manager.unit_state(name))[1]
                if (command, state) in (("start", "active"), ("stop", "inactive")):
                    echo(f"unchanged {name} ({state})")
                    continue
            try:
                result = await asyncio.wait_for(manager.run_job(JOB_METHODS[command], name), JOB_TIMEOUT)
            except TimeoutError:
                raise ApplyError(f"{name}: {command} did not finish within {JOB_TIMEOUT:.0f}s") from None
            changed += 1
            echo(f"{command} {name}: {result}")
            if result != "done":
                raise ApplyError(f"{command} {name}: job {result}")
    except SystemdError as err:
        raise ApplyError(str(err)) from err
    finally:
        await manager.close()
    return changed
