"""`fleetctl drain`, `uncordon`, `plan` and `scale` on a real lab (etcd, systemd --user managers,
fleetd): the unit moves off the drained node with its new copy started before the old one stops,
new units stay off it, list-machines, explain and plan say it is drained, uncordon lets units
back; scale starts and destroys template instances and says where they went."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from labtools import active_on, fleetctl, lab_up, wait_for

from fleetpy.lab.lab import Lab

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_up(
        "fdr",
        "--nodes", "3", "--etcd-members", "1", "--agent-ttl", "2s",
        "--metadata", "node1=role=api", "--metadata", "node2=role=worker", "--metadata", "node3=role=worker",
    ) as lab:  # fmt: skip
        yield lab


def test_drain_moves_the_unit_new_copy_first_and_keeps_new_units_off(lab: Lab, tmp_path: Path) -> None:
    log = tmp_path / "web.log"
    log.touch()
    os.chmod(tmp_path, 0o755)
    (tmp_path / "web.service").write_text(
        "[Service]\n"
        f"ExecStart=/bin/sh -c 'echo start >> {log}; exec sleep 1000'\n"
        f"ExecStop=/bin/sh -c 'echo stop >> {log}'\n"
        "[X-Fleet]\nMachineMetadata=role=worker\n"
    )
    fleetctl(lab, "start", str(tmp_path / "web.service"))
    (first,) = wait_for("web to run", lambda: active_on(lab, "web.service"))
    other = {"node2": "node3", "node3": "node2"}[first]
    assert lab.state is not None
    drained_id = lab.state.node(first).machine_id

    started = time.monotonic()
    out = fleetctl(lab, "drain", drained_id[:12])
    took = time.monotonic() - started
    other_ip = lab.state.node(other).ip
    assert f"Unit web.service moved to {drained_id[:0]}" in out and f"/{other_ip}" in out, out
    assert out.splitlines()[-1].startswith("Machine ") and out.endswith("drained\n"), out
    print(f"\ndrain of 1 unit: {took:.2f}s")
    assert active_on(lab, "web.service") == [other]
    # The new copy started before the old one stopped.
    wait_for("the old copy's stop", lambda: log.read_text().split() == ["start", "start", "stop"], 10)

    listed = fleetctl(lab, "list-machines", "--no-legend", "--full")
    assert f"{drained_id}\t" in listed
    (row,) = [line for line in listed.splitlines() if line.startswith(drained_id)]
    assert row.endswith("role=worker (drained)"), listed
    assert "drained" in fleetctl(lab, "list-machines", "--fields", "machine,state", "--full", "--no-legend")

    # A new worker unit would go to the idle drained node by load; it goes to the other one.
    (tmp_path / "extra.service").write_text(
        "[Service]\nExecStart=/bin/sleep 1000\n[X-Fleet]\nMachineMetadata=role=worker\n"
    )
    # plan says where it would go, and why, without submitting it.
    planned = fleetctl(lab, "plan", str(tmp_path / "extra.service"))
    other_id = lab.state.node(other).machine_id
    assert planned.splitlines()[0].startswith(f"extra.service -> {other_id[:8]}... : "), planned
    assert f"excluded {drained_id[:8]}... (machine is drained)" in planned, planned
    assert "extra.service" not in fleetctl(lab, "list-unit-files")
    fleetctl(lab, "start", str(tmp_path / "extra.service"))
    assert active_on(lab, "extra.service") == [other]
    explained = fleetctl(lab, "explain", "extra.service")
    assert f"excluded {drained_id[:8]}... (machine is drained)" in explained, explained

    out = fleetctl(lab, "uncordon", drained_id[:12])
    assert out.endswith("takes units again\n"), out
    assert "(drained)" not in fleetctl(lab, "list-machines")
    (tmp_path / "late.service").write_text(
        "[Service]\nExecStart=/bin/sleep 1000\n[X-Fleet]\nMachineMetadata=role=worker\n"
    )
    fleetctl(lab, "start", str(tmp_path / "late.service"))
    assert active_on(lab, "late.service") == [first]
    assert active_on(lab, "web.service") == [other]  # moved units stay where they went
    fleetctl(lab, "destroy", "web.service", "extra.service", "late.service")


def test_scale_starts_instances_and_removes_the_highest_first(lab: Lab, tmp_path: Path) -> None:
    template = tmp_path / "app@.service"
    template.write_text("[Service]\nExecStart=/bin/sleep 1000\n")
    assert lab.state is not None
    ips = {n.ip for n in lab.state.nodes}
    out = fleetctl(lab, "scale", f"{template}=3")
    launched = sorted(line.split()[1] for line in out.splitlines() if line.startswith("Unit "))
    assert launched == ["app@1.service", "app@2.service", "app@3.service"], out
    assert all(line.rsplit("/", 1)[-1] in ips for line in out.splitlines() if line.startswith("Unit ")), out
    for n in (1, 2, 3):
        assert len(wait_for(f"app@{n} to run", lambda n=n: active_on(lab, f"app@{n}.service"))) == 1

    out = fleetctl(lab, "scale", "app@.service=1")
    assert out.splitlines()[:2] == ["Destroyed app@3.service", "Destroyed app@2.service"], out
    assert "Unit app@1.service launched on " in out, out
    units = fleetctl(lab, "list-unit-files", "--no-legend")
    assert [line.split()[0] for line in units.splitlines() if line.startswith("app@")] == [
        "app@.service",
        "app@1.service",
    ]
    out = fleetctl(lab, "scale", "app@.service=2")
    assert "Unit app@2.service launched on " in out, out
    fleetctl(lab, "scale", "app@.service=0")
    fleetctl(lab, "destroy", "app@.service")
