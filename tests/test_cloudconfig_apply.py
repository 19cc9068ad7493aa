"""cloud-config apply: what lands where under --root, idempotency, refusals, and a real user manager."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from fleetpy.cloudinit.apply import ApplyError, apply_user_data, detect_ipv4
from fleetpy.cloudinit.cli import apply_command
from fleetpy.lab.node import Node

pytest_plugins = ["fixtures_nodes"]

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGqbU2dTb1VvPfz2yq1Y2KiR8eHxLQeGcJ0bUzvXfKpq test@example"
OTHER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ0yfM3hE3hZz6T3uKk8Y9m3Y1pQd0v0bq9rS7mN1xYz old@example"

USER_DATA = f"""\
#cloud-config
hostname: core-01
ssh_authorized_keys:
  - {KEY}
users:
  - name: core
write_files:
  - path: /etc/motd
    permissions: "0640"
    content: hello
  - path: /opt/bin/blob
    encoding: b64
    permissions: "0755"
    content: aGk=
coreos:
  etcd2:
    name: "%H"
    advertise-client-urls: http://$private_ipv4:2379
    initial-cluster: core-01=http://10.0.0.1:2380
    heartbeat-interval: 100
  fleet:
    public-ip: $public_ipv4
    metadata: role=web,zone=a
    etcd_servers: http://10.0.0.1:2379,http://10.0.0.2:2379
    agent_ttl: 20s
    disable_engine: true
    shared_volume_dir: /mnt/fleet-volumes
    token_limit: 50
  units:
    - name: hello.service
      enable: true
      content: |
        [Service]
        ExecStart=/bin/sleep 1000
        [Install]
        WantedBy=multi-user.target
      drop-ins:
        - name: 10-env.conf
          content: |
            [Service]
            Environment=GREETING=hi
    - name: scratch.service
      runtime: true
      content: |
        [Service]
        ExecStart=/bin/true
    - name: unwanted.service
      mask: true
"""


def apply(root: Path, text: str = USER_DATA, **kwargs) -> tuple[int, list[str]]:
    lines: list[str] = []
    kwargs.setdefault("private_ipv4", "10.0.0.1")
    kwargs.setdefault("public_ipv4", "203.0.113.1")
    changes = apply_user_data(text, root=root, echo=lines.append, **kwargs)
    return changes, lines


def tree(root: Path) -> dict[str, tuple[int, float, str]]:
    """Every path under root with its mode, mtime and content or link target."""
    result = {}
    for path in sorted(root.rglob("*")):
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            body = "-> " + os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            body = path.read_text()
        else:
            body = "dir"
        result[str(path.relative_to(root))] = (st.st_mode, st.st_mtime_ns, body)
    return result


def test_apply_writes_files_with_modes_and_encodings(tmp_path: Path) -> None:
    apply(tmp_path)
    motd = tmp_path / "etc/motd"
    assert motd.read_text() == "hello"
    assert stat.S_IMODE(motd.stat().st_mode) == 0o640
    assert (tmp_path / "opt/bin/blob").read_bytes() == b"hi"
    assert stat.S_IMODE((tmp_path / "opt/bin/blob").stat().st_mode) == 0o755
    assert (tmp_path / "etc/hostname").read_text() == "core-01\n"


def test_authorized_keys_are_merged_once_with_private_modes(tmp_path: Path) -> None:
    keys = tmp_path / "root/.ssh/authorized_keys"
    keys.parent.mkdir(parents=True)
    keys.write_text(f"{OTHER_KEY}\n{KEY}\n")
    apply(tmp_path)
    assert keys.read_text() == f"{OTHER_KEY}\n{KEY}\n"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600


def test_users_are_not_created_under_another_root(tmp_path: Path) -> None:
    _, lines = apply(tmp_path)
    assert any(line.startswith("users: not created (core)") for line in lines)
    assert not (tmp_path / "etc/passwd").exists()


def test_etcd2_options_become_an_environment_drop_in_and_a_unit(tmp_path: Path) -> None:
    apply(tmp_path)
    drop_in = (tmp_path / "etc/systemd/system/etcd2.service.d/20-cloudinit.conf").read_text()
    assert drop_in == (
        "[Service]\n"
        'Environment="ETCD_NAME=%H"\n'
        'Environment="ETCD_ADVERTISE_CLIENT_URLS=http://10.0.0.1:2379"\n'
        'Environment="ETCD_INITIAL_CLUSTER=core-01=http://10.0.0.1:2380"\n'
        'Environment="ETCD_HEARTBEAT_INTERVAL=100"\n'
    )
    unit = (tmp_path / "etc/systemd/system/etcd2.service").read_text()
    assert "ExecStart=/usr/bin/etcd\n" in unit
    # fleet's etcd_api is left at auto (v3 when offered): etcd's v2 API stays off, as etcd ships.
    assert "ETCD_ENABLE_V2" not in unit


def test_etcd2_serves_its_v2_api_only_to_a_fleet_on_v2(tmp_path: Path) -> None:
    apply(tmp_path, USER_DATA.replace("    agent_ttl: 20s\n", "    agent_ttl: 20s\n    etcd-api: v2\n"))
    unit = (tmp_path / "etc/systemd/system/etcd2.service").read_text()
    assert "Environment=ETCD_ENABLE_V2=true\n" in unit


def test_fleet_conf_is_what_fleetd_reads(tmp_path: Path) -> None:
    # Imported here so that only this test depends on fleetd's module.
    from fleetpy.fleetd.config import build_config

    _, lines = apply(tmp_path)
    conf = tmp_path / "etc/fleet/fleet.conf"
    config = build_config({}, environ={}, config_file=str(conf))
    assert config.public_ip == "203.0.113.1"
    assert config.metadata == {"role": "web", "zone": "a"}
    assert config.etcd_servers == ("http://10.0.0.1:2379", "http://10.0.0.2:2379")
    assert config.agent_ttl == 20.0
    assert config.disable_engine is True
    assert config.shared_volume_dir == "/mnt/fleet-volumes"
    # token_limit is CoreOS fleet's; our fleetd would refuse a file that has it.
    assert "token_limit" not in conf.read_text()
    assert "fleet: options fleetd does not read, left out: token_limit" in lines
    env = (tmp_path / "etc/systemd/system/fleet.service.d/20-cloudinit.conf").read_text()
    assert 'Environment="FLEET_ETCD_SERVERS=http://10.0.0.1:2379,http://10.0.0.2:2379"\n' in env
    assert 'Environment="FLEET_METADATA=role=web,zone=a"\n' in env


def test_units_drop_ins_runtime_mask_and_enable(tmp_path: Path) -> None:
    apply(tmp_path)
    system = tmp_path / "etc/systemd/system"
    assert (system / "hello.service").read_text().startswith("[Service]\nExecStart=/bin/sleep 1000\n")
    assert (system / "hello.service.d/10-env.conf").read_text() == "[Service]\nEnvironment=GREETING=hi\n"
    assert (tmp_path / "run/systemd/system/scratch.service").is_file()
    assert not (system / "scratch.service").exists()
    assert os.readlink(system / "unwanted.service") == "/dev/null"
    # As `systemctl --root` does: the link names the unit where the target system sees it.
    assert (
        os.readlink(system / "multi-user.target.wants/hello.service") == "/etc/systemd/system/hello.service"
    )


def test_commands_are_not_sent_to_the_host_manager_for_another_root(tmp_path: Path) -> None:
    text = USER_DATA + "    - name: hello.service\n      command: start\n"
    _, lines = apply(tmp_path, text)
    assert "units: commands not run: --root is not / and the system manager reads /" in lines


def test_second_apply_changes_nothing(tmp_path: Path) -> None:
    first, _ = apply(tmp_path)
    before = tree(tmp_path)
    second, lines = apply(tmp_path)
    assert first > 0
    assert second == 0
    assert tree(tmp_path) == before  # same content, modes and mtimes
    assert [line for line in lines if line.startswith(("created", "updated"))] == []
    assert sum(line.startswith("unchanged ") for line in lines) == len(
        [p for p in before.values() if p[2] != "dir"]
    )


def test_changed_content_and_mode_are_rewritten(tmp_path: Path) -> None:
    apply(tmp_path)
    motd = tmp_path / "etc/motd"
    motd.write_text("edited")
    (tmp_path / "etc/hostname").chmod(0o600)
    changes, lines = apply(tmp_path)
    assert changes == 2
    assert f"updated {motd}" in lines
    assert motd.read_text() == "hello"
    assert stat.S_IMODE((tmp_path / "etc/hostname").stat().st_mode) == 0o644


def test_dry_run_changes_nothing_and_says_what_it_would_do(tmp_path: Path) -> None:
    changes, lines = apply(tmp_path, dry_run=True)
    assert changes > 0
    assert f"would create {tmp_path / 'etc/motd'}" in lines
    assert list(tmp_path.iterdir()) == []


def test_invalid_user_data_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "user-data"
    # Valid files first, then an error: nothing may be written before validation is done.
    path.write_text(USER_DATA.replace("agent_ttl: 20s", "agent_ttl: soon"))
    root = tmp_path / "root"
    root.mkdir()
    result = CliRunner().invoke(
        apply_command,
        [str(path), "--root", str(root), "--private-ipv4", "10.0.0.1", "--public-ipv4", "10.0.0.1"],
    )
    assert result.exit_code == 1
    assert "bad duration" in result.output
    assert "nothing was changed" in result.output
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("path", ["/../../etc/x", "/etc/../../x"])
def test_paths_climbing_out_of_the_root_are_refused(tmp_path: Path, path: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    text = f"#cloud-config\nhostname: core-01\nwrite_files:\n  - path: {path}\n    content: x\n"
    with pytest.raises(ApplyError, match="outside"):
        apply(root, text)
    assert list(root.iterdir()) == []
    assert not (tmp_path / "x").exists()


def test_symlinks_out_of_the_root_are_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "etc").symlink_to(outside)
    text = "#cloud-config\nwrite_files:\n  - path: /etc/x\n    content: x\n"
    with pytest.raises(ApplyError, match="outside"):
        apply(root, text)
    assert list(outside.iterdir()) == []


def test_missing_address_for_a_variable_is_an_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("fleetpy.cloudinit.apply.detect_ipv4", lambda: None)
    text = "#cloud-config\ncoreos:\n  fleet:\n    public-ip: $private_ipv4\n"
    with pytest.raises(ApplyError, match=r"\$private_ipv4"):
        apply(tmp_path, text, private_ipv4=None, public_ipv4=None)
    assert list(tmp_path.iterdir()) == []


def test_detected_address_is_not_loopback() -> None:
    address = detect_ipv4()
    assert address is None or not address.startswith("127.")


@pytest.mark.integration
def test_unit_command_starts_the_unit_on_a_real_user_manager(tmp_path: Path, systemd_node: Node) -> None:
    bus = systemd_node.env["DBUS_SESSION_BUS_ADDRESS"]
    text = """\
#cloud-config
coreos:
  units:
    - name: hello.service
      command: start
      content: |
        [Service]
        ExecStart=/bin/sleep 1000
"""
    root = tmp_path / "root"
    root.mkdir()
    first, lines = apply(root, text, bus=bus)
    assert first == 2  # the unit file and the start job
    assert "start hello.service: done" in lines
    # A user manager reads units from its own config dir, not from under --root.
    unit_file = systemd_node.dir / "home/.config/systemd/user/hello.service"
    assert unit_file.is_file()
    state = systemd_node.run(["systemctl", "--user", "is-active", "hello.service"])
    assert state.stdout.strip() == "active"
    again, lines = apply(root, text, bus=bus)
    assert again == 0
    assert "unchanged hello.service (active)" in lines


def test_cli_prints_a_line_per_action_and_a_summary(tmp_path: Path) -> None:
    path = tmp_path / "user-data"
    path.write_text("#cloud-config\nhostname: core-01\n")
    root = tmp_path / "root"
    args = [str(path), "--root", str(root)]
    first = CliRunner().invoke(apply_command, args)
    second = CliRunner().invoke(apply_command, args)
    assert (first.exit_code, second.exit_code) == (0, 0)
    assert first.output == f"created {root}/etc/hostname\n1 change(s)\n"
    assert second.output == f"unchanged {root}/etc/hostname\nno changes\n"
