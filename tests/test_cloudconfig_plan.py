"""The pure half of cloud-config apply: the plan reads the target tree and writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetpy.cloudinit import load
from fleetpy.cloudinit.execute import useradd_argv
from fleetpy.cloudinit.plan import ApplyError, FileChange, LinkChange, Target, plan

USER_DATA = """\
#cloud-config
hostname: core-01
write_files:
  - path: /etc/motd
    content: hello
coreos:
  etcd2:
    name: "%H"
  fleet:
    metadata: role=web
    token_limit: 50
  units:
    - name: hello.service
      enable: true
      command: start
      content: |
        [Service]
        ExecStart=/bin/sleep 1000
        [Install]
        WantedBy=multi-user.target
"""


def target(root: Path) -> Target:
    return Target(root, "system", root / "etc/systemd/system", root / "run/systemd/system", run_commands=True)


def tree(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


def test_the_plan_lists_every_change_and_writes_nothing(tmp_path: Path) -> None:
    before = tree(tmp_path)
    result = plan(load(USER_DATA), target(tmp_path))
    assert tree(tmp_path) == before
    files = {c.path.relative_to(tmp_path).as_posix() for c in result.changes if isinstance(c, FileChange)}
    assert files == {
        "etc/motd",
        "etc/hostname",
        "etc/systemd/system/etcd2.service",
        "etc/systemd/system/etcd2.service.d/20-cloudinit.conf",
        "etc/fleet/fleet.conf",
        "etc/systemd/system/fleet.service.d/20-cloudinit.conf",
        "etc/systemd/system/hello.service",
    }
    links = [c for c in result.changes if isinstance(c, LinkChange)]
    assert [(link.path.relative_to(tmp_path).as_posix(), link.target) for link in links] == [
        ("etc/systemd/system/multi-user.target.wants/hello.service", "/etc/systemd/system/hello.service")
    ]
    # Under --root the system manager reads /, so commands are left out, with a note.
    assert result.commands == []
    assert any("commands not run" in note for note in result.notes)
    assert any("token_limit" in note for note in result.notes)


def test_a_path_that_climbs_out_of_the_root_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "escape").symlink_to("/tmp")
    text = "#cloud-config\nwrite_files:\n  - path: /etc/escape/x\n    content: hi\n"
    with pytest.raises(ApplyError, match="outside"):
        plan(load(text), target(tmp_path))


def test_useradd_argv_carries_the_user_options() -> None:
    user = {"name": "core", "gecos": "Core User", "groups": ["sudo", "docker"], "system": True}
    assert useradd_argv(user) == [
        "useradd", "--comment", "Core User", "--groups", "sudo,docker", "--system", "--create-home", "core",
    ]  # fmt: skip
    assert useradd_argv({"name": "x", "no_create_home": True})[-2:] == ["--no-create-home", "x"]
