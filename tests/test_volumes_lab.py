"""Local volumes on a real lab (etcd, systemd --user managers, fleetd processes, fleetctl): a
unit keeps the machine its volume lives on and finds its data there after a stop and start;
with that node killed it waits, and fleetctl list-units says why; `fleetctl volume rm` lets it
start afresh on the other worker; `fleetctl list-volumes` shows where each volume lives; and
`fleetctl volume move` takes a database-like unit's data to the other worker, where it answers
with its old records and a new one; and with its volume shared (Volume=NAME:shared, the lab's
one host directory given to every node), the same unit, its node killed, is started on the other
worker by the engine alone and answers there with its old records."""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from labtools import active_on, fleetctl, lab_up, wait_for

from bench.shared_volume import SERVER as KVDB  # a database in miniature: records over HTTP
from fleetpy.lab.lab import Lab

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_up(
        "fvl",
        "--nodes", "3", "--etcd-members", "1", "--agent-ttl", "2s",
        "--metadata", "node1=role=api", "--metadata", "node2=role=worker", "--metadata", "node3=role=worker",
    ) as lab:  # fmt: skip
        yield lab


def test_a_unit_keeps_its_volume_node_waits_when_it_dies_and_moves_once_forgotten(
    lab: Lab, tmp_path: Path
) -> None:
    assert lab.state is not None
    os.chmod(tmp_path, 0o755)
    # The path through systemd's ${} expansion, as `podman run -v ${FLEET_VOLUME_data}:/data` gets it.
    (tmp_path / "db.sh").write_text(
        'if [ -f "$1/seen" ]; then echo again >> "$1/seen"; else echo first > "$1/seen"; fi\n'
        "exec sleep 1000\n"
    )
    (tmp_path / "db.service").write_text(
        f"[Service]\nExecStart=/bin/sh {tmp_path / 'db.sh'} ${{FLEET_VOLUME_data}}\n"
        "[X-Fleet]\nVolume=data\nMachineMetadata=role=worker\n"
    )

    def seen(node: str) -> list[str]:
        path = lab.book.dir / node / "volumes" / "data" / "seen"
        return path.read_text().split() if path.exists() else []

    fleetctl(lab, "start", str(tmp_path / "db.service"))
    (home,) = wait_for("db to run", lambda: active_on(lab, "db.service"))
    other = {"node2": "node3", "node3": "node2"}[home]
    home_id = lab.state.node(home).machine_id
    assert seen(home) == ["first"]
    assert (
        fleetctl(lab, "list-volumes", "--full", "--no-legend")
        == f"data\tlocal\t{home_id}/{lab.state.node(home).ip}\t-\tdb.service\n"
    )

    # Stopped, its node made busier, started again: back on its volume's node, data intact.
    fleetctl(lab, "stop", "db.service")
    (tmp_path / "busy.service").write_text(
        f"[Service]\nExecStart=/bin/sleep 1000\n[X-Fleet]\nMachineID={home_id}\n"
    )
    fleetctl(lab, "start", str(tmp_path / "busy.service"))
    fleetctl(lab, "start", "db.service")
    assert active_on(lab, "db.service") == [home]
    assert seen(home) == ["first", "again"] and seen(other) == []

    # Its node dies: db waits for it, and says why.
    lab.kill_node(home)

    def waiting() -> str | None:
        out = fleetctl(lab, "list-units", "--fields", "unit,reason", "--no-legend", "--full")
        return next((line for line in out.splitlines() if line.startswith("db.service\t")), None)

    line = wait_for(
        "db to wait for its volume",
        lambda: (row := waiting()) and "a machine that is gone" in row and row,
        30,
    )
    assert f"volume data lives on {home_id[:8]}..." in line and "fleetctl volume rm data" in line, line
    assert seen(other) == []

    # Forgotten: it starts afresh on the other worker, which now holds the volume.
    assert fleetctl(lab, "volume", "rm", "data") == "Volume data forgotten\n"
    wait_for("db to run on the other worker", lambda: active_on(lab, "db.service") == [other], 30)
    assert seen(other) == ["first"]
    other_id = lab.state.node(other).machine_id
    assert fleetctl(lab, "list-volumes", "--full", "--no-legend").startswith(f"data\tlocal\t{other_id}")
    fleetctl(lab, "destroy", "db.service", "busy.service")


KVDB_PORT = 8086


def _records(ip: str, port: int = KVDB_PORT) -> str | None:
    try:
        with urllib.request.urlopen(f"http://{ip}:{port}/", timeout=2) as response:
            return response.read().decode()
    except OSError:
        return None


def test_a_volume_moves_with_its_data_and_the_unit_answers_with_it_on_the_other_node(
    lab: Lab, tmp_path: Path
) -> None:
    assert lab.state is not None
    # Both workers up (the test above kills one).
    for name in ("node2", "node3"):
        if lab.state.node(name).machine_id not in lab.machines():
            lab.restart_node(name)
    os.chmod(tmp_path, 0o755)
    (tmp_path / "kvdb.py").write_text(KVDB)
    (tmp_path / "kvdb.service").write_text(
        f"[Service]\nExecStart=/usr/bin/python3 {tmp_path / 'kvdb.py'} ${{FLEET_VOLUME_kvdata}} {KVDB_PORT}\n"
        "[X-Fleet]\nVolume=kvdata\nMachineMetadata=role=worker\n"
    )
    fleetctl(lab, "start", str(tmp_path / "kvdb.service"))
    (home,) = wait_for("kvdb to run", lambda: active_on(lab, "kvdb.service"))
    other = {"node2": "node3", "node3": "node2"}[home]
    home_ip, other_ip = lab.state.node(home).ip, lab.state.node(other).ip
    assert wait_for("kvdb to answer", lambda: _records(home_ip)) == "start 1\n"

    # The baseline, in this run: a stop and a start in place, until it answers with its records.
    began = time.monotonic()
    fleetctl(lab, "stop", "kvdb.service")
    fleetctl(lab, "start", "kvdb.service")
    wait_for("kvdb to answer again", lambda: _records(home_ip) == "start 1\nstart 2\n")
    in_place = time.monotonic() - began

    began = time.monotonic()
    out = fleetctl(lab, "volume", "move", "kvdata", lab.state.node(other).machine_id)
    moved = time.monotonic() - began
    answered = wait_for("kvdb to answer on the other node", lambda: _records(other_ip))
    answering = time.monotonic() - began
    assert answered == "start 1\nstart 2\nstart 3\n", answered
    assert active_on(lab, "kvdb.service") == [other] and _records(home_ip) is None
    lines = out.splitlines()
    assert lines[0].startswith(f"Moving volume kvdata from {lab.state.node(home).machine_id[:8]}..."), out
    assert lines[1:3] == [
        f"Stopping the units using it on {lab.state.node(home).machine_id[:8]}.../{home_ip}",
        f"Copying its data from {lab.state.node(home).machine_id[:8]}.../{home_ip}",
    ], out
    assert lines[3].startswith(f"Volume kvdata moved to {lab.state.node(other).machine_id[:8]}..."), out
    # The old copy stays on the first node, set aside; the volume lives on the other.
    volumes = lab.book.dir / home / "volumes"
    aside = wait_for("the old copy set aside", lambda: list(volumes.glob("kvdata~moved-*")))
    assert (aside[0] / "records").read_text() == "start 1\nstart 2\n" and not (volumes / "kvdata").exists()
    listed = fleetctl(lab, "list-volumes", "--full", "--no-legend")
    assert (
        f"kvdata\tlocal\t{lab.state.node(other).machine_id}/{other_ip}\tmoved from {lab.state.node(home).machine_id} in "
        in listed
    )
    print(
        f"\nvolume move on a real lab: fleetctl volume move took {moved:.2f}s, the unit answered with its "
        f"old records on the other node {answering:.2f}s after the command started; baseline in this run: "
        f"stop and start in place until it answered {in_place:.2f}s"
    )
    fleetctl(lab, "destroy", "kvdb.service")


def _both_workers_up(lab: Lab) -> None:
    assert lab.state is not None
    for name in ("node2", "node3"):
        if lab.state.node(name).machine_id not in lab.machines():
            lab.restart_node(name)


def test_a_shared_volume_unit_answers_with_its_old_records_on_another_node_after_its_node_dies(
    lab: Lab, tmp_path: Path
) -> None:
    assert lab.state is not None
    _both_workers_up(lab)
    port = KVDB_PORT + 1
    os.chmod(tmp_path, 0o755)
    (tmp_path / "kvdb.py").write_text(KVDB)
    (tmp_path / "shareddb.service").write_text(
        f"[Service]\nExecStart=/usr/bin/python3 {tmp_path / 'kvdb.py'} ${{FLEET_VOLUME_dbshared}} {port}\n"
        "[X-Fleet]\nVolume=dbshared:shared\nMachineMetadata=role=worker\n"
    )
    fleetctl(lab, "start", str(tmp_path / "shareddb.service"))
    (home,) = wait_for("shareddb to run", lambda: active_on(lab, "shareddb.service"))
    other = {"node2": "node3", "node3": "node2"}[home]
    home_ip, other_ip = lab.state.node(home).ip, lab.state.node(other).ip
    assert wait_for("shareddb to answer", lambda: _records(home_ip, port)) == "start 1\n"
    # In the directory every node shares, not in the node's own volume dir, and pinned nowhere.
    records = lab.book.dir / "shared-volumes" / "dbshared" / "records"
    assert records.read_text() == "start 1\n" and not (lab.book.dir / home / "volumes" / "dbshared").exists()
    listed = [line.split() for line in fleetctl(lab, "list-volumes", "--no-legend").splitlines()]
    assert ["dbshared", "shared", "-", "-", "shareddb.service"] in listed, listed

    began = time.monotonic()
    lab.kill_node(home)
    answered = wait_for(
        "shareddb to answer on the other node", lambda: _records(other_ip, port), timeout=60, interval=0.1
    )
    answering = time.monotonic() - began
    assert answered == "start 1\nstart 2\n", answered
    assert active_on(lab, "shareddb.service") == [other]
    print(
        f"\nshared volume on a real lab (agent TTL 2s): node killed to the unit answering with its old "
        f"records on the other node in {answering:.2f}s"
    )
    fleetctl(lab, "destroy", "shareddb.service")
