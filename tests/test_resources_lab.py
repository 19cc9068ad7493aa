"""Resources and live facts on a real lab (etcd, systemd --user managers, fleetd per node): a unit
larger than every machine is pending with what is short, three units land as spread or binpack
say, and a constraint on a fact a node's facts.d executable publishes places the unit there."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from labtools import fleetctl, lab_up, wait_for

from fleetpy.conf.values import format_bytes
from fleetpy.lab.lab import Lab

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_up(
        "frs",
        "--nodes", "2", "--etcd-members", "1", "--agent-ttl", "2s",
    ) as lab:  # fmt: skip
        yield lab


def machines(lab: Lab) -> dict[str, dict]:
    """The lab's machines by node name, as `list-machines -o json` shows them."""
    assert lab.state is not None
    by_id = {n.machine_id: n.name for n in lab.state.nodes}
    return {by_id[m["id"]]: m for m in json.loads(fleetctl(lab, "list-machines", "-o", "json"))}


def placed(lab: Lab) -> dict[str, str]:
    """Unit -> node where it is active, by list-units."""
    assert lab.state is not None
    by_ip = {n.ip: n.name for n in lab.state.nodes}
    return {
        fields[0]: by_ip[fields[1].rsplit("/", 1)[-1]]
        for line in fleetctl(lab, "list-units", "--no-legend", "--full").splitlines()
        if (fields := line.split()) and fields[2] == "active"
    }


def reasons(lab: Lab) -> dict[str, str]:
    out = fleetctl(lab, "list-units", "--no-legend", "--fields", "unit,reason")
    return {unit: reason for unit, _, reason in (line.partition("\t") for line in out.splitlines())}


def write_unit(directory: Path, name: str, service: str = "", fleet: str = "") -> str:
    path = directory / name
    text = f"[Service]\nExecStart=/bin/sleep 1000\n{service}"
    path.write_text(text + (f"[X-Fleet]\n{fleet}" if fleet else ""))
    return str(path)


def memory(lab: Lab) -> int:
    """The memory both nodes advertise (read from the host: the same for both)."""
    sizes = {name: int(m["capacity"]["memory"]) for name, m in machines(lab).items()}
    assert len(set(sizes.values())) == 1, sizes
    return sizes["node1"]


def test_machines_advertise_capacity_and_live_facts(lab: Lab) -> None:
    node1 = machines(lab)["node1"]
    assert node1["capacity"]["cpus"] >= 1 and node1["capacity"]["memory"] > 0
    assert node1["facts"]["os"] == "linux" and {"load1", "memory_free", "kernel"} <= node1["facts"].keys()
    wide = fleetctl(lab, "list-machines", "-o", "wide")
    assert wide.splitlines()[0].split()[-4:] == ["CPUS", "MEMORY", "FREE", "LOAD"], wide


def test_a_unit_larger_than_every_node_is_pending_with_what_is_short(lab: Lab, tmp_path: Path) -> None:
    size = memory(lab)
    fleetctl(
        lab, "start", "--no-block", write_unit(tmp_path, "huge.service", fleet=f"MemoryRequest={2 * size}\n")
    )
    want = (
        f"no machine fits: not enough memory (needs {format_bytes(2 * size)}, the best has "
        f"{format_bytes(size)} free) on all 2 machines"
    )
    wait_for("the pending reason", lambda: reasons(lab).get("huge.service") == want, 15)
    assert "huge.service" not in placed(lab)
    fleetctl(lab, "destroy", "huge.service")


def test_three_units_land_as_spread_and_binpack_say(lab: Lab, tmp_path: Path) -> None:
    size = memory(lab)
    small, large = int(0.4 * size), int(0.7 * size)

    def trio(prefix: str, strategy: str) -> list[str]:
        fleet = f"Strategy={strategy}\n"
        return [
            write_unit(tmp_path, f"{prefix}1.service", fleet=f"{fleet}MemoryRequest={small}\n"),
            write_unit(tmp_path, f"{prefix}2.service", fleet=f"{fleet}MemoryRequest={small}\n"),
            # The large one reserves through systemd's own limit.
            write_unit(tmp_path, f"{prefix}3.service", service=f"MemoryMax={large}\n", fleet=fleet),
        ]

    # spread: the small ones go apart, so the large one fits nowhere.
    fleetctl(lab, "start", "--no-block", *trio("spread", "spread"))
    on = wait_for(
        "spread1 and 2", lambda: (p := placed(lab)).keys() >= {"spread1.service", "spread2.service"} and p
    )
    assert on["spread1.service"] != on["spread2.service"], on
    wait_for("spread3's reason", lambda: "not enough memory" in reasons(lab).get("spread3.service", ""), 15)
    assert "spread3.service" not in placed(lab)
    fleetctl(lab, "destroy", "spread1.service", "spread2.service", "spread3.service")

    # binpack: the small ones share a node, so the large one has the other.
    fleetctl(lab, "start", *trio("binpack", "binpack"))
    on = wait_for(
        "all three", lambda: len(p := {u: n for u, n in placed(lab).items() if "binpack" in u}) == 3 and p
    )
    assert on["binpack1.service"] == on["binpack2.service"] != on["binpack3.service"], on
    fleetctl(lab, "destroy", "binpack1.service", "binpack2.service", "binpack3.service")


def test_a_constraint_on_a_live_fact_places_the_unit_where_it_holds(lab: Lab, tmp_path: Path) -> None:
    unit = write_unit(tmp_path, "cuda.service", fleet='MachineConstraint="gpu==/^tesla/" "kernel>=3.0"\n')
    # No node has the fact yet: the unit waits, saying why.
    fleetctl(lab, "start", "--no-block", unit)
    wait_for(
        "the pending reason",
        lambda: "gpu==/^tesla/ does not hold" in reasons(lab).get("cuda.service", ""),
        15,
    )

    facts = lab.dir / "node2" / "facts.d"
    facts.mkdir(exist_ok=True)
    (facts / "gpu").write_text("#!/bin/sh\necho gpu=tesla-t4\n")
    (facts / "gpu").chmod(0o755)
    wait_for("node2's gpu fact", lambda: machines(lab)["node2"]["facts"].get("gpu") == "tesla-t4", 20)
    wait_for("cuda on node2", lambda: placed(lab).get("cuda.service") == "node2", 20)
    assert "gpu" not in machines(lab)["node1"]["facts"]

    assert lab.state is not None
    node1 = lab.state.node("node1").machine_id
    planned = fleetctl(lab, "plan", "cuda.service")
    assert f"excluded {node1[:8]}... (gpu==/^tesla/ does not hold (no gpu))" in planned, planned
    fleetctl(lab, "destroy", "cuda.service")
