"""Issue 14: the event history of a machine gone for good leaves etcd after the retention, while
its MachineLost stays in the leader's history (real fleetds on a real lab, real etcd)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from labtools import short_lab_dir, wait_for

from fleetpy.cli.fleetctl import cli
from fleetpy.lab.lab import Lab

pytestmark = pytest.mark.integration


def test_a_killed_nodes_history_is_removed_after_the_retention_and_its_loss_stays_visible(monkeypatch):
    # fleetd reads FLEET_* variables, and the lab's fleetds inherit this environment.
    monkeypatch.setenv("FLEET_EVENTS_RETENTION", "3s")
    monkeypatch.setenv("FLEET_ENGINE_RECONCILE_INTERVAL", "1s")
    with short_lab_dir("obsr") as directory:
        lab = Lab(directory)
        lab.up(node_count=3, network="loopback", agent_ttl="2s", containers=False)
        leader = lab.leader()
        victim = next(n for n in lab.state.nodes if n.machine_id != leader)
        all_reporters = {n.machine_id for n in lab.state.nodes}
        wait_for(
            "every node's history",
            lambda: set(lab.read(lambda r: r.event_reporters())) == all_reporters,
        )
        lab.kill_node(victim.name)
        wait_for(
            "the victim's history removed",
            lambda: victim.machine_id not in lab.read(lambda r: r.event_reporters()),
            timeout=60,
        )
        assert set(lab.read(lambda r: r.event_reporters())) == all_reporters - {victim.machine_id}
        on_leader = next(n.name for n in lab.state.nodes if n.machine_id == leader)
        endpoint = f"unix://{directory / on_leader / 'fleet.sock'}"
        result = CliRunner().invoke(
            cli, ["--endpoint", endpoint, "events", "--machine", victim.machine_id[:8], "-o", "json"]
        )
        assert result.exit_code == 0, result.output
        events = json.loads(result.output)
        assert {e["reporter"] for e in events} == {leader}  # the victim's own history is gone
        assert [e["kind"] for e in events if e["machineID"] == victim.machine_id] == ["MachineLost"]
