"""Faults on a real lab (real etcd, real systemd --user managers, real fleetds), and after each
one the invariants of harness.py. Each scenario adds its numbers to the JSON report.

Counts can be raised or lowered for a longer soak or a quicker run:
FLEETPY_FAULTS_LEADER_KILLS (20) and FLEETPY_FAULTS_ETCD_OUTAGE_S (60).
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from harness import AGENT_TTL, SLEEP, TEMPLATES, WORKLOAD, ApiLoad, Harness, Scenario, options

from fleetpy.registry import Job
from fleetpy.unit import UnitFile

pytestmark = pytest.mark.integration

LEADER_KILLS = int(os.environ.get("FLEETPY_FAULTS_LEADER_KILLS", "20"))
ETCD_OUTAGE = float(os.environ.get("FLEETPY_FAULTS_ETCD_OUTAGE_S", "60"))


def steady(h: Harness):
    """Bring every node, fleetd and etcd back, and wait for the invariants; the snapshot."""
    h.lab.etcd_start("0")
    for node in h.lab.state.nodes:
        if node.partitioned:
            h.lab.heal(node.name)
        if not h.node_alive(node.name):
            h.lab.restart_node(node.name)
        elif not h.lab.fleetd_alive(node):
            h.lab.start_fleetd(node.name)
    h.lab.wait_registered()
    assert_etcd_intact(h)
    return h.settle()[1]


def assert_etcd_intact(h: Harness) -> None:
    """Nothing in etcd was lost: every job of the workload, as submitted, and its unit file."""
    jobs, files = h.etcd_contents()
    for unit, template in WORKLOAD.items():
        assert unit in jobs, f"job {unit} was lost"
        assert (jobs[unit].hash, jobs[unit].desired_state) == (
            UnitFile.parse(TEMPLATES[template]).hash,
            "launched",
        )
    assert {j.hash for j in jobs.values()} <= files, "unit files were lost"


def crashed(h: Harness, before: dict[str, int], stopped: set[str]) -> int:
    """fleetds that died although the scenario did not stop them."""
    alive = h.fleetd_pids()
    return sum(1 for node, pid in before.items() if node not in stopped and alive.get(node) != pid)


def test_leader_kills_hand_over_scheduling_and_restart_nothing(harness):
    h, scenario = harness, Scenario(f"leader_kill_x{LEADER_KILLS}")
    before = steady(h)
    pids = h.fleetd_pids()
    for i in range(LEADER_KILLS):
        leader = h.leader() or h.nodes[0]
        others = [n for n in h.nodes if n != leader]
        with ApiLoad(h, others, scenario):
            started = time.monotonic()
            h.lab.stop_fleetd(leader, crash=True)
            # Back at once, as systemd's Restart= would bring it: within its TTL, so nothing of
            # its machine may move; the lease is still held by the dead engine until it expires.
            h.lab.start_fleetd(leader)
            probe = f"probe{i}.service"
            h.submit(others[0], {probe: "plain@.service"})
            while not h.observe().nodes_of(probe):
                assert time.monotonic() - started < 4 * AGENT_TTL + 10, f"{probe} never ran"
                time.sleep(0.1)
            scenario.recovery_s.append(time.monotonic() - started)
            h.lab.wait_registered(names=[leader])
        h.destroy(others[0], [probe])
        pids[leader] = h.lab.state.node(leader).fleetd_pid
    after = steady(h)
    scenario.needless_restarts = len(h.restarted(before, after, set(h.nodes)))
    scenario.crashes = crashed(h, pids, set())
    h.record(scenario)
    assert scenario.needless_restarts == 0, (h.restarted(before, after, set(h.nodes)), h.log_lines("engine"))
    assert scenario.crashes == 0 and scenario.conflict_violations == 0


def test_sigterm_hands_leadership_over_within_a_second_and_fleetd_stops_within_two(harness):
    # B10: the stopped leader did not resign, leaving a lease TTL without a scheduler.
    h, scenario = harness, Scenario("sigterm_leader")
    before = steady(h)
    for _ in range(3):
        leader = h.leader()
        started = time.monotonic()
        h.lab.stop_fleetd(leader)
        stopped = time.monotonic() - started
        while h.leader() in (None, leader):
            time.sleep(0.02)
        handover = time.monotonic() - started
        scenario.recovery_s.append(handover)
        scenario.notes.append(f"fleetd stopped in {stopped:.2f}s, lease handed over in {handover:.2f}s")
        h.lab.start_fleetd(leader)
        h.lab.wait_registered(names=[leader])
        assert handover < 1.0, scenario.notes[-1]
        assert stopped < 2.0, scenario.notes[-1]
    after = steady(h)
    scenario.needless_restarts = len(h.restarted(before, after, set(h.nodes)))
    h.record(scenario)
    assert scenario.needless_restarts == 0, (h.restarted(before, after, set(h.nodes)), h.log_lines("engine"))


def test_a_dead_node_s_units_move_and_no_other_unit_restarts(harness):
    h, scenario = harness, Scenario("node_kill")
    before = steady(h)
    victim = "node3"
    healthy = set(h.nodes) - {victim}
    pids = h.fleetd_pids()
    with ApiLoad(h, sorted(healthy), scenario):
        started = time.monotonic()
        h.lab.kill_node(victim)
        elapsed, after = h.settle(healthy, scenario=scenario)
    scenario.recovery_s.append(time.monotonic() - started)
    scenario.needless_restarts = len(h.restarted(before, after, healthy))
    scenario.crashes = crashed(h, pids, {victim})
    h.record(scenario)
    assert scenario.needless_restarts == 0, (
        h.restarted(before, after, healthy),
        h.log_lines("engine", "reconcile"),
    )
    assert scenario.crashes == 0 and scenario.conflict_violations == 0
    steady(h)


def test_a_partitioned_node_s_units_move_and_the_healed_node_stops_its_copies(harness):
    h, scenario = harness, Scenario("partition_and_heal")
    before = steady(h)
    victim = "node3"
    healthy = set(h.nodes) - {victim}
    pids = h.fleetd_pids()
    with ApiLoad(h, sorted(healthy), scenario):
        started = time.monotonic()
        h.lab.partition(victim)
        moved, _ = h.settle(healthy, scenario=scenario)
        scenario.notes.append(f"units of the partitioned node ran elsewhere after {moved:.1f}s")
        time.sleep(max(0.0, 2 * AGENT_TTL + 5 - (time.monotonic() - started)))
        h.lab.heal(victim)
        healed = time.monotonic()
        h.lab.wait_registered(names=[victim])
        elapsed, after = h.settle(scenario=scenario)
    scenario.recovery_s.append(time.monotonic() - healed)
    # The partitioned node kept its copies until it could read its schedule again.
    scenario.duplicate_window_s = max(scenario.duplicate_window_s, healed - started - moved + elapsed)
    scenario.needless_restarts = len(h.restarted(before, after, healthy))
    scenario.crashes = crashed(h, pids, set())
    h.record(scenario)
    assert scenario.needless_restarts == 0, (h.restarted(before, after, healthy), h.log_lines("engine"))
    assert scenario.crashes == 0 and scenario.conflict_violations == 0


def test_an_etcd_outage_stops_moves_and_restarts_nothing(harness):
    h, scenario = harness, Scenario(f"etcd_outage_{ETCD_OUTAGE:.0f}s")
    before = steady(h)
    pids = h.fleetd_pids()
    with ApiLoad(h, h.nodes, scenario, interval=0.5):
        h.lab.etcd_kill("0")
        time.sleep(ETCD_OUTAGE)
        assert h.observe().running == before.running  # units ran on through the outage
        h.lab.etcd_start("0")
        started = time.monotonic()
        h.lab.wait_registered()
        elapsed, _ = h.settle(scenario=scenario)
        # The window in which an engine reading expired records would move every unit.
        time.sleep(AGENT_TTL + 1)
        after = h.observe()
    scenario.recovery_s.append(time.monotonic() - started - AGENT_TTL - 1)
    scenario.needless_restarts = len(h.restarted(before, after, set(h.nodes)))
    scenario.crashes = crashed(h, pids, set())
    h.record(scenario)
    assert scenario.needless_restarts == 0, (h.restarted(before, after, set(h.nodes)), h.log_lines("engine"))
    assert scenario.crashes == 0
    assert scenario.report()["server_errors_5xx_not_503"] == 0, scenario.requests


def _restart_all(h: Harness, scenario: Scenario, *, pause_s: float, stagger_s: float, one_by_one: bool):
    before = steady(h)
    started = time.monotonic()
    if one_by_one:
        for node in h.nodes:
            h.lab.stop_fleetd(node)
            h.lab.start_fleetd(node)
            h.lab.wait_registered(names=[node])
    else:
        threads = [threading.Thread(target=h.lab.stop_fleetd, args=(n,)) for n in h.nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        time.sleep(pause_s)
        for node in h.nodes:
            h.lab.start_fleetd(node)
            time.sleep(stagger_s)
        h.lab.wait_registered()
    h.settle(scenario=scenario)
    # Give a wrongly impatient engine the chance to move units before we look.
    time.sleep(2 * AGENT_TTL)
    after = h.observe()
    scenario.recovery_s.append(time.monotonic() - started - 2 * AGENT_TTL)
    problems = h.restarted(before, after, set(h.nodes))
    scenario.needless_restarts = len(problems)
    h.record(scenario)
    assert not problems, (problems, h.log_lines("engine"))
    assert scenario.conflict_violations == 0


def test_restarting_every_fleetd_at_once_restarts_and_moves_nothing(harness):
    _restart_all(harness, Scenario("restart_all_at_once"), pause_s=0, stagger_s=0, one_by_one=False)


def test_restarting_every_fleetd_one_by_one_restarts_and_moves_nothing(harness):
    _restart_all(harness, Scenario("restart_one_by_one"), pause_s=0, stagger_s=0, one_by_one=True)


def test_all_fleetds_down_past_their_ttl_then_back_a_second_apart_restart_nothing(harness):
    # B8: 7 of 13 units restarted, and the unconstrained ones piled onto the first machine back.
    _restart_all(
        harness,
        Scenario("all_down_past_ttl_back_1s_apart"),
        pause_s=2 * AGENT_TTL + 1,
        stagger_s=1,
        one_by_one=False,
    )


def test_four_clients_churn_while_a_node_dies(harness):
    h, scenario = harness, Scenario("churn_4_clients_node_dies")
    steady(h)
    victim = "node3"
    healthy = sorted(set(h.nodes) - {victim})
    pids = h.fleetd_pids()
    errors: list[str] = []

    def client(k: int) -> None:
        via = healthy[k % len(healthy)]
        with h.client(via) as http:
            for j in range(12):
                name = f"churn{k}-{j}.service"
                body = {"desiredState": "launched", "options": options(SLEEP)}
                for method, url, payload in (
                    ("PUT", f"/fleet/v1/units/{name}", body),
                    ("PUT", f"/fleet/v1/units/{name}", {"desiredState": "loaded"}),
                    ("PUT", f"/fleet/v1/units/{name}", {"desiredState": "launched"}),
                    ("DELETE", f"/fleet/v1/units/{name}", None)
                    if j % 2
                    else ("GET", "/fleet/v1/units", None),
                ):
                    try:
                        status = str(http.request(method, f"http://fleet{url}", json=payload).status_code)
                    except Exception as error:  # noqa: BLE001 - counted, then shown
                        status, _ = "unreachable", errors.append(repr(error))
                    scenario.requests[status] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(1)
    h.lab.kill_node(victim)
    for thread in threads:
        thread.join()
    elapsed, _ = h.settle(set(healthy), scenario=scenario)
    scenario.recovery_s.append(time.monotonic() - started)
    scenario.crashes = crashed(h, pids, {victim})
    h.record(scenario)
    h.destroy(healthy[0], [j.name for j in h.read(lambda r: r.jobs()) if j.name.startswith("churn")])
    assert scenario.report()["server_errors_5xx_not_503"] == 0, (scenario.requests, errors[:3])
    assert scenario.crashes == 0 and scenario.conflict_violations == 0
    steady(h)


def test_b2_a_stored_unit_that_no_longer_parses_is_quarantined_and_scheduling_goes_on(harness):
    h, scenario = harness, Scenario("b2_unparsable_stored_unit")
    steady(h)
    leader = h.leader()
    digest = "b2" + "0" * 38

    async def store_a_bad_unit(registry):
        await registry.store.put(registry.key("unit", digest), "[Service]\nExecStart=/bin/true\r[oops\n")
        await registry.create_job(Job("b2-bad.service", digest, "launched"))

    h.read(store_a_bad_unit)
    started = time.monotonic()
    h.submit("node1", {"b2-good.service": "plain@.service"})
    while not h.observe().nodes_of("b2-good.service"):
        assert time.monotonic() - started < 15, "the engine stopped scheduling"
        time.sleep(0.1)
    scenario.recovery_s.append(time.monotonic() - started)
    reason = h.read(lambda r: r.pending()).get("b2-bad.service")
    with h.client("node2") as client:
        listed = client.get("http://fleet/fleetpy/v1/units/b2-bad.service/pending").json()
    h.record(scenario)
    h.destroy("node1", ["b2-bad.service", "b2-good.service"])
    assert reason and "line 2" in reason, reason
    assert listed["reason"] == reason
    assert h.leader() == leader  # the leader kept leading, and scheduling


def test_b7_editing_a_dead_machines_metadata_does_not_keep_it_alive(harness):
    h, scenario = harness, Scenario("b7_metadata_edit_of_dead_machine")
    before = steady(h)
    victim = "node3"
    machine = h.machine_of(victim)
    healthy = set(h.nodes) - {victim}
    started = time.monotonic()
    h.lab.kill_node(victim)
    with h.client("node1") as client:
        while machine in {m.id for m in h.read(lambda r: r.machines())}:
            client.patch(
                "http://fleet/fleet/v1/machines",
                json=[{"op": "add", "path": f"/{machine}/metadata/edited", "value": str(time.monotonic())}],
            )
            assert time.monotonic() - started < 2 * AGENT_TTL + 3, "the edited machine stayed alive"
            time.sleep(0.3)
    expired = time.monotonic() - started
    elapsed, after = h.settle(healthy, scenario=scenario)
    scenario.recovery_s.append(time.monotonic() - started)
    scenario.notes.append(f"machine expired {expired:.1f}s after the kill despite metadata edits")
    scenario.needless_restarts = len(h.restarted(before, after, healthy))
    h.record(scenario)
    assert scenario.needless_restarts == 0, (h.restarted(before, after, healthy), h.log_lines("engine"))
    steady(h)
