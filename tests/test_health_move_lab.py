"""HealthCheckMoveAfter on a real lab (etcd, systemd --user managers, fleetd per node): a unit
whose exec check fails only on the node it was placed on is restarted there HealthCheckMoveAfter
times, then moved to another node where it stays healthy, and list-units, status, events and
explain say why; a unit whose check fails everywhere ends up pending with the reason."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from labtools import fleetctl, lab_up, wait_for

from fleetpy.lab.lab import Lab

pytestmark = pytest.mark.integration

# Checked every second, unhealthy at the first failure, restarted twice on one node, then moved.
CHECK = "HealthCheckInterval=1s\nHealthCheckThreshold=1\n"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_up(
        "fhm",
        "--nodes", "3", "--etcd-members", "1", "--agent-ttl", "2s",
    ) as lab:  # fmt: skip
        yield lab


def _states(lab: Lab, unit: str) -> list[dict]:
    return [r for r in json.loads(fleetctl(lab, "list-units", "-o", "json")) if r["name"] == unit]


def _node_of(lab: Lab, machine_id: str) -> str:
    assert lab.state is not None
    (node,) = [n.name for n in lab.state.nodes if n.machine_id.startswith(machine_id.rstrip("."))]
    return node


def test_a_unit_failing_its_check_on_one_node_is_restarted_then_moved_and_says_why(
    lab: Lab, tmp_path: Path
) -> None:
    assert lab.state is not None
    os.chmod(tmp_path, 0o755)
    starts = tmp_path / "starts.log"
    starts.touch()
    os.chmod(starts, 0o666)
    unit = tmp_path / "mover.service"
    # Where would it go? Its check then fails on that node only (each node has its own hostname).
    unit.write_text("[Service]\nExecStart=/bin/sleep 1000\n")
    planned = fleetctl(lab, "plan", str(unit)).splitlines()[0]
    first = _node_of(lab, planned.split(" -> ")[1].split()[0])
    first_id = lab.state.node(first).machine_id
    unit.write_text(
        "[Service]\n"
        f"ExecStartPre=/bin/sh -c 'uname -n >> {starts}'\n"
        "ExecStart=/bin/sleep 1000\n"
        "[X-Fleet]\n"
        f'HealthCheckExec="/bin/sh" "-c" "test $(uname -n) != {first}"\n'
        f"{CHECK}HealthCheckMoveAfter=2\n"
    )
    started = time.monotonic()
    fleetctl(lab, "start", str(unit))

    def healthy_elsewhere() -> dict | None:
        for state in _states(lab, "mover.service"):
            health = state.get("health") or {}
            if state["machineID"] != first_id and health.get("status") == "healthy":
                return state
        return None

    moved = wait_for("mover.service healthy on another node", healthy_elsewhere, timeout=120, interval=0.5)
    took = time.monotonic() - started
    second = _node_of(lab, moved["machineID"])
    # The baseline, in the same run: a unit whose same check passes, from start to healthy.
    baseline = tmp_path / "steady.service"
    baseline.write_text(
        f"[Service]\nExecStart=/bin/sleep 1000\n[X-Fleet]\nHealthCheckExec=/bin/true\n{CHECK}"
    )
    started = time.monotonic()
    fleetctl(lab, "start", str(baseline))
    wait_for(
        "steady.service healthy",
        lambda: any(
            (s.get("health") or {}).get("status") == "healthy" for s in _states(lab, "steady.service")
        ),
        timeout=60,
        interval=0.5,
    )
    steady = time.monotonic() - started
    fleetctl(lab, "destroy", "steady.service")
    print(
        f"\nstart -> restarted twice, moved and healthy on {second}: {took:.1f}s (start -> healthy: {steady:.1f}s)"
    )
    # Started once and restarted twice on the first node, then once on the second; never again.
    assert starts.read_text().split() == [first, first, first, second], starts.read_text()
    assert moved["health"]["restarts"] == 0 and moved["systemdActiveState"] == "active"

    # list-units shows where it runs now and that it is healthy.
    rows = fleetctl(lab, "list-units", "--fields", "unit,machine,active,health", "--no-legend", "--full")
    (row,) = [line for line in rows.splitlines() if line.startswith("mover.service")]
    assert moved["machineID"] in row and "active" in row and row.endswith("healthy"), rows

    # The events say each step and why.
    def messages() -> list[tuple[str, str]]:
        events = json.loads(fleetctl(lab, "events", "--unit", "mover.service", "-o", "json"))
        return [(e["kind"], e["message"]) for e in events]

    # Each fleetd writes its events in batches: the first node's last one may still be on its way.
    found = wait_for(
        "three UnitUnhealthy events", lambda: len([k for k, _ in messages() if k == "UnitUnhealthy"]) == 3
    )
    found = messages()
    unhealthy = [m for kind, m in found if kind == "UnitUnhealthy"]
    assert unhealthy[0].endswith("restarting it (restart 1)") and unhealthy[1].endswith("(restart 2)")
    assert f"exec /bin/sh -c test $(uname -n) != {first}: exit status 1" in unhealthy[2]
    assert unhealthy[2].endswith(
        "not restarted here again after 2 restarts (HealthCheckMoveAfter=2): the engine moves it to another machine"
    )
    (moved_event,) = [m for kind, m in found if kind == "UnitMoved"]
    assert moved_event.startswith(
        f"mover.service moved from {first_id[:8]} (failed its health check on {first_id[:8]}... after 2 restarts) "
        f"to {moved['machineID'][:8]}"
    ), moved_event
    # status ends with the unit's events; explain names the avoided machine.
    assert "failed its health check on" in fleetctl(lab, "status", "mover.service")
    explained = fleetctl(lab, "explain", "mover.service")
    assert (
        f"excluded {first_id[:8]}... (failed its health check on {first_id[:8]}... after 2 restarts)"
        in explained
    )

    # It stays: a few more check rounds, no more starts.
    time.sleep(3)
    assert starts.read_text().split() == [first, first, first, second]
    fleetctl(lab, "destroy", "mover.service")


def test_a_unit_failing_its_check_everywhere_ends_pending_with_the_reason(lab: Lab, tmp_path: Path) -> None:
    assert lab.state is not None
    unit = tmp_path / "doomed.service"
    unit.write_text(
        f"[Service]\nExecStart=/bin/sleep 1000\n[X-Fleet]\nHealthCheckExec=/bin/false\n{CHECK}HealthCheckMoveAfter=1\n"
    )
    fleetctl(lab, "start", str(unit))

    def pending_reason() -> str | None:
        rows = [
            r for r in json.loads(fleetctl(lab, "list-units", "-o", "json")) if r["name"] == "doomed.service"
        ]
        return next((r["reason"] for r in rows if r.get("reason") and "machineID" not in r), None)

    reason = wait_for("doomed.service pending", pending_reason, timeout=180, interval=0.5)
    assert reason == (
        "no machine fits: its health check failed there (new content or a destroy and submit clears this) "
        "on all 3 machines"
    ), reason
    moves = [
        e
        for e in json.loads(fleetctl(lab, "events", "--unit", "doomed.service", "-o", "json"))
        if e["kind"] == "UnitMoved"
    ]
    assert len(moves) == 2 and all("failed its health check on" in e["message"] for e in moves), moves
    avoided = lab.read(lambda registry: registry.avoided())
    assert sorted(a.machine_id for a in avoided if a.unit == "doomed.service") == sorted(
        n.machine_id for n in lab.state.nodes
    )
    assert all(a.restarts == 1 and a.message == "exec /bin/false: exit status 1" for a in avoided), avoided
    # Destroying it forgets the machines it failed on (once the engine saw it gone).
    fleetctl(lab, "destroy", "doomed.service")
    wait_for("the avoidances to go", lambda: not lab.read(lambda registry: registry.avoided()), timeout=30)
    fleetctl(lab, "start", str(unit))
    wait_for(
        "doomed.service to run again", lambda: any("machineID" in r for r in _states(lab, "doomed.service"))
    )
    fleetctl(lab, "destroy", "doomed.service")
