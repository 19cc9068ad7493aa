"""The Vagrantfile and the per-node user-data it provisions: valid for Vagrant, cloud-init and us."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fleetpy.cloudinit import load, validate
from fleetpy.cloudinit.apply import apply_user_data
from fleetpy.cloudinit.render import default_member_ips, render_cluster_user_data

pytestmark = pytest.mark.integration

TOP = Path(__file__).resolve().parent.parent
NODES = 3
KEYS = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGqbU2dTb1VvPfz2yq1Y2KiR8eHxLQeGcJ0bUzvXfKpq you@laptop"]


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    # CI installs these Debian packages; without them the check would silently not happen.
    assert path, f"{name} not found: apt-get install -y {package}"
    return path


def cloud_init_schema(path: Path) -> subprocess.CompletedProcess:
    argv = [tool("cloud-init", "cloud-init"), "schema", "--config-file", str(path)]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def rendered(index: int) -> str:
    ips = default_member_ips(NODES)
    return render_cluster_user_data(
        NODES, index, ips[index - 1], ssh_authorized_keys=KEYS, metadata="role=web,zone=a"
    )


def test_vagrantfile_validates(tmp_path: Path) -> None:
    # Keep Vagrant's state out of the checkout and out of the real home directory.
    env = {
        **os.environ,
        "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"),
        "VAGRANT_HOME": str(tmp_path / "home"),
    }
    result = subprocess.run(
        [tool("vagrant", "vagrant"), "validate", "--ignore-provider"],
        cwd=TOP,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "core-03" in result.stdout


@pytest.mark.parametrize("index", range(1, NODES + 1))
def test_rendered_user_data_is_valid_for_us_and_for_cloud_init(tmp_path: Path, index: int) -> None:
    text = rendered(index)
    assert [f for f in validate(text) if f.severity == "error"] == []
    path = tmp_path / "user-data"
    path.write_text(text)
    result = cloud_init_schema(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rendered_user_data_fills_in_each_node() -> None:
    configs = [load(rendered(i)) for i in range(1, NODES + 1)]
    assert [c.hostname for c in configs] == ["core-01", "core-02", "core-03"]
    assert [c.etcd2["name"] for c in configs] == ["core-01", "core-02", "core-03"]
    cluster = (
        "core-01=http://172.17.8.101:2380,core-02=http://172.17.8.102:2380,core-03=http://172.17.8.103:2380"
    )
    assert {c.etcd2["initial_cluster"] for c in configs} == {cluster}
    assert {c.fleet["metadata"] for c in configs} == {"role=web,zone=a"}
    assert configs[0].ssh_authorized_keys == KEYS
    # The bootstrap is what real cloud-init runs: it must be there, executable, and called.
    data = yaml.safe_load(rendered(2))
    bootstrap = data["write_files"][0]
    assert bootstrap["path"] == "/usr/local/sbin/fleetpy-bootstrap"
    assert bootstrap["content"] == (TOP / "fleetpy/templates/fleetpy-bootstrap.sh").read_text()
    assert data["runcmd"] == [
        [
            "/usr/local/sbin/fleetpy-bootstrap",
            "/var/lib/cloud/instance/user-data.txt",
            "172.17.8.102",
            "/vagrant",
        ]
    ]


def test_vagrant_erb_template_renders_the_same_user_data() -> None:
    ruby = tool("ruby", "vagrant")
    script = (
        'require "./vagrant/render"\n'
        'ips = (1..3).map { |i| "172.17.8.#{100 + i}" }\n'
        'print FleetpyUserData.render(index: Integer(ARGV[0]), ips: ips, name_prefix: "core",\n'
        '  metadata: "role=web,zone=a", fleetpy_source: "/vagrant", ssh_authorized_keys: [ARGV[1]],\n'
        '  cluster_token: "fleetpy-cluster")\n'
    )
    for index in range(1, NODES + 1):
        result = subprocess.run(
            [ruby, "-e", script, str(index), KEYS[0]], cwd=TOP, capture_output=True, text=True, check=True
        )
        assert result.stdout == rendered(index)


def test_render_refuses_an_address_that_is_not_the_nodes() -> None:
    with pytest.raises(ValueError, match="node 2 has address 172.17.8.102"):
        render_cluster_user_data(3, 2, "172.17.8.101")


def test_rendered_user_data_applies_with_the_nodes_address(tmp_path: Path) -> None:
    lines: list[str] = []
    apply_user_data(
        rendered(1), root=tmp_path, private_ipv4="172.17.8.101", public_ipv4="172.17.8.101", echo=lines.append
    )
    drop_in = (tmp_path / "etc/systemd/system/etcd2.service.d/20-cloudinit.conf").read_text()
    assert 'Environment="ETCD_NAME=core-01"\n' in drop_in
    assert 'Environment="ETCD_ADVERTISE_CLIENT_URLS=http://172.17.8.101:2379"\n' in drop_in
    assert 'public_ip="172.17.8.101"\n' in (tmp_path / "etc/fleet/fleet.conf").read_text()
    assert os.access(tmp_path / "usr/local/sbin/fleetpy-bootstrap", os.X_OK)
    assert os.readlink(tmp_path / "etc/systemd/system/etcd.service") == "/dev/null"
