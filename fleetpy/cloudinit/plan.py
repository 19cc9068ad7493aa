"""What applying user-data would do, worked out without writing anything.

`plan()` turns parsed user-data into file and link changes plus unit commands. It reads the
target tree (existing keys, passwd, unit files) but never writes, and it checks every path
against the tree it must stay in, so bad user-data or an escaping path fails here, before
execute.py changes anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetpy.cloudinit.contents import (
    DROP_IN,
    ETCD_UNIT,
    FLEET_UNIT,
    environment_drop_in,
    etcd_unit,
    fleet_conf,
)
from fleetpy.cloudinit.model import CloudConfig, Unit
from fleetpy.unit.errors import InvalidUnitFile
from fleetpy.unit.file import UnitFile

# The options our fleetd reads from fleet.conf (fleetpy.fleetd.config); the other
# coreos.fleet keys are valid for CoreOS fleet but would make our fleetd refuse the file.
FLEETD_OPTIONS = (
    "etcd_servers",
    "etcd_api",
    "etcd_key_prefix",
    "etcd_cafile",
    "etcd_certfile",
    "etcd_keyfile",
    "etcd_request_timeout",
    "public_ip",
    "metadata",
    "capacity",
    "facts_dir",
    "facts_interval",
    "shared_volume_dir",
    "agent_ttl",
    "engine_reconcile_interval",
    "disable_engine",
    "verbosity",
)


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


def plan(config: CloudConfig, target: Target) -> Plan:
    """Everything applying `config` to `target` would do; reads the target but changes nothing."""
    result = Plan()
    _plan_machine(config, target.root, result)
    # etcd2.service and the drop-ins go where the chosen manager reads units (under ROOT for
    # the system manager, the user manager's own dir otherwise), so its commands can start them.
    if config.etcd2:
        result.changes += [
            # etcd's v2 API stays off (as etcd ships it) unless this machine's fleetd uses it.
            FileChange(
                _inside(target.unit_dir, ETCD_UNIT),
                etcd_unit(target.bus, enable_v2=(config.fleet or {}).get("etcd_api") == "v2"),
            ),
            FileChange(
                _inside(target.unit_dir, f"{ETCD_UNIT}.d/{DROP_IN}"),
                environment_drop_in("ETCD", config.etcd2),
            ),
        ]
    if config.fleet:
        _plan_fleet(config.fleet, target, result)
    for unit in config.units:
        _plan_unit(unit, target, result)
    if result.commands and not target.live:
        result.notes.append("units: commands not run: --root is not / and the system manager reads /")
        result.commands = []
    return result


def merge_keys(path: Path, keys: list[str]) -> bytes:
    """The authorized_keys file with `keys` appended unless an identical line is already there."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        lines = []
    present = {line.strip() for line in lines}
    lines += [key.strip() for key in keys if key.strip() not in present]
    return ("\n".join(lines) + "\n").encode()


def _plan_machine(config: CloudConfig, root: Path, result: Plan) -> None:
    """write_files, hostname, the root user's SSH keys and users."""
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
            FileChange(keys, merge_keys(keys, config.ssh_authorized_keys), 0o600, dir_mode=0o700)
        )
    if config.users:
        names = ", ".join(u["name"] for u in config.users)
        if root == Path("/"):
            result.users = list(config.users)
        else:
            result.notes.append(
                f"users: not created ({names}): --root is not /, users are made on the running system only"
            )


def _plan_fleet(fleet: dict[str, Any], target: Target, result: Plan) -> None:
    options = {k: v for k, v in fleet.items() if k in FLEETD_OPTIONS}
    if skipped := sorted(set(fleet) - set(options)):
        result.notes.append(f"fleet: options fleetd does not read, left out: {', '.join(skipped)}")
    result.changes += [
        FileChange(_inside(target.root, "/etc/fleet/fleet.conf"), fleet_conf(options)),
        FileChange(
            _inside(target.unit_dir, f"{FLEET_UNIT}.d/{DROP_IN}"), environment_drop_in("FLEET", options)
        ),
    ]


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
