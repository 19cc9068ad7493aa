"""Volumes on this machine: made safely under their directory, handed to units.

A local volume is a directory `<volume dir>/<name>` (mode 0750); a shared one
(Volume=NAME:shared) is `<shared volume dir>/<name>`, on storage every machine mounts. Either
is made without following a symlink and never outside its directory, whatever was planted
there. A unit finds its volume's path in $FLEET_VOLUME_<NAME>, from an Environment= line the
agent adds to the unit file it installs (no shell, no drop-in to keep in step).
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from fleetpy.unit.fleet import check_volume_name, volume_environment_name
from fleetpy.unit.quoting import environment

VOLUME_MODE = 0o750


class VolumeError(Exception):
    """A volume that cannot be used here, with the reason for people."""


def prepare_volume(root: Path, name: str) -> Path:
    """The directory of volume `name` under `root`, made if missing; VolumeError if the path is
    not a plain directory inside `root` (a symlink, a file, or a name that would leave it)."""
    check_volume_name(name)
    root.mkdir(mode=VOLUME_MODE, parents=True, exist_ok=True)
    base = root.resolve()
    path = base / name
    if path.parent != base:
        raise VolumeError(f"volume {name!r} would leave {base}")
    with contextlib.suppress(FileExistsError):  # made before, or something planted: see below
        os.mkdir(path, VOLUME_MODE)
    info = os.lstat(path)  # lstat: a symlink is refused, never followed
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise VolumeError(
            f"volume {name}: {path} is not a plain directory (a symlink or a file was put there)"
        )
    if path.resolve() != path:
        raise VolumeError(f"volume {name}: {path} resolves outside {base}")
    return path


def prepare_shared_volume(root: Path | None, name: str) -> Path:
    """The directory of shared volume `name` under the shared volume directory `root`, as
    prepare_volume makes it. `root` itself is never made: missing, it is shared storage that is
    not mounted, and a directory made in its place would hide the data on local disk."""
    if root is None:
        raise VolumeError(
            f"volume {name} is shared and this fleetd has no shared volume directory (--shared-volume-dir)"
        )
    if not root.is_dir():
        raise VolumeError(
            f"volume {name} is shared and the shared volume directory {root} is missing "
            "(is the shared storage mounted?)"
        )
    return prepare_volume(root, name)


def with_volumes(text: str, paths: dict[str, Path]) -> str:
    """The unit file `text` with a [Service] Environment= line per volume (systemd merges a
    repeated section), so ExecStart can say ${FLEET_VOLUME_data}."""
    if not paths:
        return text
    lines = [environment(volume_environment_name(name), str(path)) for name, path in paths.items()]
    return text.rstrip("\n") + "\n\n[Service]\n" + "\n".join(lines) + "\n"
