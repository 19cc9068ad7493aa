"""Local volumes on a real lab (etcd, systemd --user managers, fleetd processes, fleetctl): a
unit keeps the machine its volume lives on and finds its data there after a stop and start;
with that node killed it waits, and fleetctl list-units says why; `fleetctl volume rm` lets it
start afresh on the other worker; `fleetctl list-volumes` shows where each volume lives."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from labtools import active_on, fleetctl, short_lab_dir, wait_for

from fleetpy.lab.lab import Lab

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with short_lab_dir("fvl") as path:
        argv = [
            sys.executable, "-m", "fleetpy.cli.fleetpy", "lab", "up", "--dir", str(path),
            "--nodes", "3", "--etcd-members", "1", "--agent-ttl", "2s",
            "--metadata", "node1=role=api", "--metadata", "node2=role=worker", "--metadata", "node3=role=worker",
        ]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        yield Lab(path)


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
        == f"data\t{home_id}/{lab.state.node(home).ip}\n"
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
    assert fleetctl(lab, "list-volumes", "--full", "--no-legend").startswith(f"data\t{other_id}")
    fleetctl(lab, "destroy", "db.service", "busy.service")
