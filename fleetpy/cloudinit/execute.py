"""Carrying out a plan: write files and links, set the hostname, add users, run unit commands.

Everything here changes the machine; what to change was decided in plan.py. Each action
prints a line, and an action whose result is already in place is reported as unchanged, so
applying the same user-data twice changes nothing the second time.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleetpy.cloudinit.plan import ApplyError, FileChange, LinkChange, Plan, Target, merge_keys
from fleetpy.conf.files import write_atomic
from fleetpy.systemd import SystemdBus, SystemdError

Echo = Callable[[str], None]
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
# What useradd takes from a cloud-config user: options with a value, then flags.
_USERADD_OPTIONS = (
    ("gecos", "--comment"),
    ("homedir", "--home-dir"),
    ("primary_group", "--gid"),
    ("shell", "--shell"),
    ("passwd", "--password"),
)
_USERADD_FLAGS = (
    ("no_user_group", "--no-user-group"),
    ("system", "--system"),
    ("no_log_init", "--no-log-init"),
)


def execute(plan: Plan, target: Target, dry_run: bool, echo: Echo) -> int:
    """Carry out `plan`, printing a line per action; returns the number of changes made."""
    changed, units_changed = _apply_changes(plan, target, dry_run, echo)
    for note in plan.notes:
        echo(note)
    changed += _apply_hostname(plan, target, dry_run, echo)
    for user in plan.users:
        changed += _apply_user(user, dry_run, echo)
    if plan.commands or units_changed:
        changed += _apply_commands(plan, target, dry_run, echo)
    return changed


def useradd_argv(user: dict[str, Any]) -> list[str]:
    """The useradd command that makes cloud-config user `user`."""
    argv = ["useradd"]
    argv += [a for key, flag in _USERADD_OPTIONS if user.get(key) for a in (flag, str(user[key]))]
    if user.get("groups"):
        argv += ["--groups", ",".join(user["groups"])]
    argv += [flag for key, flag in _USERADD_FLAGS if user.get(key)]
    argv.append("--no-create-home" if user.get("no_create_home") else "--create-home")
    return [*argv, user["name"]]


def _apply_changes(plan: Plan, target: Target, dry_run: bool, echo: Echo) -> tuple[int, bool]:
    """Files and links; returns how many changed and whether any of them is in a unit dir."""
    changed = 0
    units_changed = False
    unit_dirs = (target.unit_dir, target.runtime_unit_dir)
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
    return changed, units_changed


def _apply_hostname(plan: Plan, target: Target, dry_run: bool, echo: Echo) -> int:
    if not plan.hostname or target.root != Path("/") or socket.gethostname() == plan.hostname:
        return 0
    if dry_run:
        echo(f"would set hostname {plan.hostname}")
    else:
        socket.sethostname(plan.hostname)
        echo(f"set hostname {plan.hostname}")
    return 1


def _apply_commands(plan: Plan, target: Target, dry_run: bool, echo: Echo) -> int:
    """coreos.units commands, after a daemon reload (also when only unit files changed)."""
    if not target.run_commands:
        for command, name in plan.commands:
            echo(f"would run {command} {name}" if dry_run else f"skipped {command} {name} (--no-commands)")
        return 0
    if not target.live:
        return 0
    return asyncio.run(_run_commands(target.bus, plan.commands, echo))


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
    if subprocess.run(["getent", "passwd", name], capture_output=True, check=False).returncode == 0:
        echo(f"unchanged user {name} (exists)")
        return 0
    if dry_run:
        echo(f"would create user {name}")
        return 1
    result = subprocess.run(useradd_argv(user), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ApplyError(f"user {name}: useradd failed: {result.stderr.strip()}")
    echo(f"created user {name}")
    if keys := user.get("ssh_authorized_keys"):
        echo(f"created {_install_user_keys(name, keys)}")
    return 1


def _install_user_keys(name: str, keys: list[str]) -> Path:
    """~name/.ssh/authorized_keys with `keys`, owned by the user; returns its path."""
    home = Path(
        subprocess.run(["getent", "passwd", name], capture_output=True, text=True, check=True).stdout.split(
            ":"
        )[5]
    )
    uid = int(subprocess.run(["id", "-u", name], capture_output=True, text=True, check=True).stdout)
    gid = int(subprocess.run(["id", "-g", name], capture_output=True, text=True, check=True).stdout)
    path = home / ".ssh/authorized_keys"
    _write(FileChange(path, merge_keys(path, keys), 0o600, uid, gid, dir_mode=0o700))
    os.chown(path.parent, uid, gid)
    return path


async def _run_commands(bus: str, commands: list[tuple[str, str]], echo: Echo) -> int:
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
            changed += await _run_command(manager, command, name, echo)
    except SystemdError as err:
        raise ApplyError(str(err)) from err
    finally:
        await manager.close()
    return changed


async def _run_command(manager: SystemdBus, command: str, name: str, echo: Echo) -> int:
    # Starting an active unit, or stopping an inactive one, is a no-op for systemd; say so,
    # to keep re-runs quiet.
    if command in ("start", "stop"):
        state = (await manager.unit_state(name))[1]
        if (command, state) in (("start", "active"), ("stop", "inactive")):
            echo(f"unchanged {name} ({state})")
            return 0
    try:
        result = await asyncio.wait_for(manager.run_job(JOB_METHODS[command], name), JOB_TIMEOUT)
    except TimeoutError:
        raise ApplyError(f"{name}: {command} did not finish within {JOB_TIMEOUT:.0f}s") from None
    echo(f"{command} {name}: {result}")
    if result != "done":
        raise ApplyError(f"{command} {name}: job {result}")
    return 1
