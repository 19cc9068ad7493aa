"""Container units on a real 3-node lab: podman units scheduled by fleetd, answering on each node's address.

Needs everything the lab needs plus podman, crun and busybox-static; anything missing fails the
tests (with what to install), never skips them. The units are the ones in units/, unchanged.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from labtools import wait_for

from fleetpy.cli.fleetctl import cli
from fleetpy.lab.image import write_podman_config
from fleetpy.lab.lab import Lab, missing_for_containers

pytestmark = pytest.mark.integration

AGENT_TTL = "2s"
UNITS = Path(__file__).parents[1] / "units"
UNIT_FILES = (
    "web@.service",
    "web-discovery@.service",
    "logger.service",
    "db.service",
    "es-offline.service",
    "kv.service",
    "records.service",
)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    missing = missing_for_containers()
    assert missing is None, missing
    lab = Lab(tmp_path_factory.mktemp("clab"))
    started = time.monotonic()
    try:
        lab.up(
            node_count=3,
            metadata={"node1": {"role": "db"}},
            network="netns",
            agent_ttl=AGENT_TTL,
            containers=True,
        )
        print(f"\nlab up (3 nodes, containers): {time.monotonic() - started:.2f}s")
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fleetctl submits unit files from its working directory, as a user would."""
    path = tmp_path_factory.mktemp("units")
    for name in UNIT_FILES:
        shutil.copy(UNITS / name, path / name)
    return path


def fleetctl(lab: Lab, workdir: Path, *args: str) -> str:
    assert lab.state is not None
    # Any live node's socket: the test kills nodes, node1's included if it ran web@1.
    alive = next(n.name for n in lab.state.nodes if n.pid)
    endpoint = f"unix://{lab.dir / alive / 'fleet.sock'}"
    with contextlib.chdir(workdir):
        result = CliRunner().invoke(cli, ["--endpoint", endpoint, *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def active_units(lab: Lab, workdir: Path) -> dict[str, list[str]]:
    """unit -> names of the nodes where it is active."""
    assert lab.state is not None
    by_id = {n.machine_id: n.name for n in lab.state.nodes}
    units: dict[str, list[str]] = {}
    for line in fleetctl(lab, workdir, "list-units", "--no-legend", "--full").splitlines():
        unit, machine, active, *_ = line.split()
        if active == "active":
            # MACHINE is "id/ip", or only "id" once the machine is gone from etcd.
            units.setdefault(unit, []).append(by_id[machine.split("/")[0]])
    return units


def http_get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read().decode().strip()
    except (urllib.error.URLError, OSError):
        return None


def etcd_value(lab: Lab, key: str) -> str | None:
    """The value the sidekicks announced, read as they write it: v3, TLS, the discovery user."""
    entry = lab.discovery_etcd().list(key).get(key)
    return entry[0] if entry else None


def node_ip(lab: Lab, name: str) -> str:
    assert lab.state is not None
    return lab.state.node(name).ip


def test_web_spreads_answers_and_is_announced(lab: Lab, workdir: Path) -> None:
    webs = [f"web@{i}.service" for i in (1, 2, 3)]
    sidekicks = [f"web-discovery@{i}.service" for i in (1, 2, 3)]
    started = time.monotonic()
    fleetctl(lab, workdir, "start", *webs, *sidekicks)
    placed = wait_for("3 webs and 3 sidekicks active", lambda: _all_active(lab, workdir, webs + sidekicks))
    assert isinstance(placed, dict)
    # Conflicts=web@*: one per machine; MachineOf: each sidekick next to its web.
    assert sorted(placed[w][0] for w in webs) == ["node1", "node2", "node3"]
    for i in (1, 2, 3):
        assert placed[f"web-discovery@{i}.service"] == placed[f"web@{i}.service"]
    for i in (1, 2, 3):
        ip = node_ip(lab, placed[f"web@{i}.service"][0])
        wait_for(f"web@{i} on {ip}:8080", lambda ip=ip, i=i: http_get(f"http://{ip}:8080/") == f"web@{i}")
    print(f"\nfleetctl start -> 3 webs answering: {time.monotonic() - started:.2f}s")
    # Commands run in a node (`fleetpy lab shell`) see that node's podman storage, and only it.
    names = lab.node(placed["web@1.service"][0]).run(["podman", "ps", "--format", "{{.Names}}"], check=True)
    assert names.stdout.split() == ["web-1"]
    for i in (1, 2, 3):
        ip = node_ip(lab, placed[f"web@{i}.service"][0])
        wait_for(
            f"/services/web/web@{i} = {ip}:8080",
            lambda ip=ip, i=i: etcd_value(lab, f"/services/web/web@{i}") == f"{ip}:8080",
        )

    fleetctl(lab, workdir, "stop", "web-discovery@2.service")
    wait_for("web@2's entry removed", lambda: etcd_value(lab, "/services/web/web@2") is None, timeout=10)
    assert etcd_value(lab, "/services/web/web@1") is not None
    # web@3 goes, so web@1 has a free machine to move to in the kill test.
    fleetctl(lab, workdir, "destroy", "web@3.service", "web-discovery@3.service", "web-discovery@2.service")
    wait_for(
        "web@3 stopped", lambda: http_get(f"http://{node_ip(lab, placed['web@3.service'][0])}:8080/") is None
    )


def test_logger_everywhere_db_on_role_db_es_offline(lab: Lab, workdir: Path) -> None:
    fleetctl(lab, workdir, "start", "logger.service", "db.service", "es-offline.service")
    units = ["logger.service", "db.service", "es-offline.service"]
    placed = wait_for("logger, db and es-offline active", lambda: _all_active(lab, workdir, units, logger=3))
    assert isinstance(placed, dict)
    assert sorted(placed["logger.service"]) == ["node1", "node2", "node3"]
    assert placed["db.service"] == ["node1"]
    es_ip = node_ip(lab, placed["es-offline.service"][0])
    banner = wait_for("es-offline on 9200", lambda: http_get(f"http://{es_ip}:9200/"))
    assert "You Know, for Search" in str(banner)
    assert wait_for("db echoes on 5432", lambda: _echo(node_ip(lab, "node1"), 5432, b"ping\n")) == b"ping\n"
    # The db's data dir is node1's own, not the host's /var/lib/fleetpy.
    assert (lab.dir / "node1" / "var-lib-fleetpy" / "db" / "hello").read_text() == "db\n"
    fleetctl(lab, workdir, "destroy", "db.service", "es-offline.service")


def test_kv_finds_its_volume_again_after_a_stop_and_start(lab: Lab, workdir: Path) -> None:
    fleetctl(lab, workdir, "start", "kv.service")
    placed = wait_for("kv active", lambda: _all_active(lab, workdir, ["kv.service"]))
    assert isinstance(placed, dict)
    (node,) = placed["kv.service"]
    assert wait_for("kv echoes on 6379", lambda: _echo(node_ip(lab, node), 6379, b"ping\n")) == b"ping\n"
    # podman's -v ${FLEET_VOLUME_kvdata}:/data is the node's own volume directory.
    starts = lab.dir / node / "volumes" / "kvdata" / "starts"
    assert len(starts.read_text().splitlines()) == 1
    fleetctl(lab, workdir, "stop", "kv.service")
    fleetctl(lab, workdir, "start", "kv.service")
    assert wait_for("kv active again", lambda: _all_active(lab, workdir, ["kv.service"]))["kv.service"] == [
        node
    ]
    wait_for("a second start in the volume", lambda: len(starts.read_text().splitlines()) == 2)
    fleetctl(lab, workdir, "destroy", "kv.service")


def test_records_keep_their_data_on_the_shared_volume_wherever_they_start(lab: Lab, workdir: Path) -> None:
    fleetctl(lab, workdir, "start", "records.service")
    placed = wait_for("records active", lambda: _all_active(lab, workdir, ["records.service"]))
    assert isinstance(placed, dict)
    url = f"http://{node_ip(lab, placed['records.service'][0])}:8088/records"
    assert wait_for("records answering", lambda: http_get(url)) == "start"
    # podman's -v "${FLEET_VOLUME_records}:/data" is the directory every node shares.
    assert (lab.dir / "shared-volumes" / "records" / "records").read_text() == "start\n"
    fleetctl(lab, workdir, "stop", "records.service")
    fleetctl(lab, workdir, "start", "records.service")
    placed = wait_for("records active again", lambda: _all_active(lab, workdir, ["records.service"]))
    url = f"http://{node_ip(lab, placed['records.service'][0])}:8088/records"
    assert wait_for("records answering again", lambda: http_get(url) == "start\nstart" and http_get(url))
    fleetctl(lab, workdir, "destroy", "records.service")


def test_killed_node_moves_web_with_its_sidekick(lab: Lab, workdir: Path) -> None:
    fleetctl(lab, workdir, "start", "web-discovery@1.service")
    placed = _all_active(lab, workdir, ["web@1.service", "web-discovery@1.service", "web@2.service"])
    assert isinstance(placed, dict)
    victim, keeper = placed["web@1.service"][0], placed["web@2.service"][0]
    lab.kill_node(victim)
    started = time.monotonic()

    def moved() -> dict[str, list[str]] | None:
        units = active_units(lab, workdir)
        web, sidekick = units.get("web@1.service", []), units.get("web-discovery@1.service", [])
        return units if web and web == sidekick and victim not in web else None

    units = wait_for(f"web@1 and its sidekick off {victim}", moved)
    assert isinstance(units, dict)
    target = units["web@1.service"][0]
    assert target not in (victim, keeper)
    ip = node_ip(lab, target)
    wait_for(f"web@1 answering on {ip}", lambda: http_get(f"http://{ip}:8080/") == "web@1")
    wait_for(
        "web@1 announced at its new address", lambda: etcd_value(lab, "/services/web/web@1") == f"{ip}:8080"
    )
    print(f"\nkill {victim} -> web@1 answering and announced on {target}: {time.monotonic() - started:.2f}s")


def test_down_leaves_no_container_mount_or_process(lab: Lab) -> None:
    assert lab.state is not None
    nodes = [n.name for n in lab.state.nodes]
    lab.down()
    leftover = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and _is_live(proc):
                text = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
                if str(lab.dir).encode() + b"/" in text:
                    leftover.append(text[:120])
        except OSError:
            continue
    assert leftover == []
    for name in nodes:
        # podman itself agrees: no container left in any node's storage.
        env = {**os.environ, **write_podman_config(lab.dir / name / "podman")}
        result = subprocess.run(["podman", "ps", "-aq"], env=env, capture_output=True, text=True, check=True)
        assert result.stdout.strip() == "", f"{name}: {result.stdout}"
    # Checked last: podman run from the host (down's cleanup, and the check above) must not
    # leave its storage's private bind mount in the host's mount namespace either.
    assert str(lab.dir) not in Path("/proc/self/mountinfo").read_text()


def _all_active(lab: Lab, workdir: Path, units: list[str], logger: int = 1) -> dict[str, list[str]] | None:
    placed = active_units(lab, workdir)
    want = {u: (logger if u == "logger.service" else 1) for u in units}
    return placed if all(len(placed.get(u, [])) == n for u, n in want.items()) else None


def _echo(host: str, port: int, data: bytes) -> bytes | None:
    try:
        with socket.create_connection((host, port), timeout=2) as conn:
            conn.sendall(data)
            return conn.recv(len(data))
    except OSError:
        return None


def _is_live(proc: Path) -> bool:
    # PID 1 on these hosts does not reap orphans: a zombie holds nothing, so it is not a leftover.
    return (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
