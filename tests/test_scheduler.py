"""The scheduling core: placement rules, stability and explanations, as pure data."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import scheduler_oracle

from fleetpy.engine import scheduler
from fleetpy.engine.scheduler import Plan, Reason, explain, plan
from fleetpy.registry.models import Assignment, Job, Machine
from fleetpy.unit import Unit, load_unit

A = "1a2b" + "0" * 28
B = "2b3c" + "0" * 28
C = "3c4d" + "0" * 28
D = "4d5e" + "0" * 28


def machine(mid: str, **metadata: str) -> Machine:
    return Machine(id=mid, metadata=dict(metadata))


def unit(name: str, fleet: str = "", state: str = "launched") -> tuple[Job, Unit]:
    text = "[Service]\nExecStart=/bin/sleep infinity\n"
    if fleet:
        text += "[X-Fleet]\n" + fleet + "\n"
    u = load_unit(name, text)
    return Job(name=name, hash=u.hash, desired_state=state), u


def where(p: Plan) -> dict[str, str]:
    return {a.unit: a.machine_id for a in p.assignments}


def pending(p: Plan) -> dict[str, str]:
    return {name: str(reason) for name, reason in p.pending.items()}


def filtered(p: Plan, name: str) -> dict[str, str]:
    return {mid: str(reason) for mid, reason in p.decisions[name].filtered.items()}


def three() -> list[Machine]:
    return [machine(A), machine(B), machine(C)]


def test_plain_units_spread_evenly_over_machines() -> None:
    p = plan(three(), [unit(f"app{i}.service") for i in range(6)], [])
    assert Counter(where(p).values()) == {A: 2, B: 2, C: 2}
    assert pending(p) == {}


def test_least_loaded_ties_go_to_lowest_machine_id() -> None:
    p = plan(three(), [unit("one.service")], [])
    assert where(p) == {"one.service": A}


def test_assignments_carry_job_hash_and_desired_state() -> None:
    job, u = unit("web.service", state="loaded")
    (a,) = plan(three(), [(job, u)], []).assignments
    assert (a.unit, a.hash, a.desired_state) == ("web.service", u.hash, "loaded")


def test_machine_metadata_lands_on_matching_machine_only() -> None:
    machines = [machine(A, role="web"), machine(B, role="db"), machine(C, role="web")]
    p = plan(machines, [unit("db.service", "MachineMetadata=role=db")], [], detail={"db.service"})
    assert where(p) == {"db.service": B}
    assert filtered(p, "db.service") == {
        A: "metadata role=db does not match",
        C: "metadata role=db does not match",
    }


def test_machine_metadata_same_key_is_either_value() -> None:
    machines = [machine(A, region="us-east"), machine(B, region="eu")]
    p = plan(machines, [unit("x.service", "MachineMetadata=region=eu\nMachineMetadata=region=ap")], [])
    assert where(p) == {"x.service": B}


def test_machine_id_pins_unit_to_that_machine() -> None:
    p = plan(three(), [unit("pinned.service", f"MachineID={C}")], [], detail={"pinned.service"})
    assert where(p) == {"pinned.service": C}
    assert p.decisions["pinned.service"].filtered[A] == Reason("machine-id", (C,))
    assert filtered(p, "pinned.service")[A] == "MachineID is 3c4d0000..."


def test_conflicting_unit_stays_pending_with_reason() -> None:
    jobs = [unit(f"web@{i}.service", "Conflicts=web@*") for i in range(1, 5)]
    p = plan(three(), jobs, [])
    assert sorted(where(p)) == ["web@1.service", "web@2.service", "web@3.service"]
    assert len(set(where(p).values())) == 3
    assert pending(p) == {
        "web@4.service": "no machine fits: conflicts with web@1.service, "
        "web@2.service, web@3.service on all 3 machines"
    }


def test_conflicts_bind_both_ways() -> None:
    jobs = [unit("a.service", "Conflicts=b.service"), unit("b.service")]
    p = plan([machine(A)], jobs, [])
    assert where(p) == {"a.service": A}
    assert pending(p) == {"b.service": "no machine fits: conflicts with a.service on the only machine"}


def test_pending_reason_counts_each_kind_of_exclusion() -> None:
    machines = [machine(A, role="web"), machine(B, role="web"), machine(C, role="db")]
    jobs = [
        unit("db.service", "MachineMetadata=role=db"),
        unit("db2.service", "MachineMetadata=role=db\nConflicts=db.service"),
    ]
    p = plan(machines, jobs, [])
    assert pending(p) == {
        "db2.service": "0/3 machines fit: 2 metadata role=db does not match, 1 conflicts with db.service"
    }


def test_no_machines_leaves_everything_pending() -> None:
    p = plan([], [unit("a.service")], [])
    assert p.assignments == ()
    assert pending(p) == {"a.service": "no machines registered"}


def test_machine_of_colocates_with_target() -> None:
    jobs = [unit("a-sidekick.service", "MachineOf=b.service"), unit("b.service")]
    current = [Assignment("b.service", B, jobs[1][1].hash, "launched")]
    p = plan(three(), jobs, current)
    assert where(p) == {"b.service": B, "a-sidekick.service": B}


def test_machine_of_follows_target_when_it_moves() -> None:
    jobs = [unit("db.service"), unit("db-announce.service", "MachineOf=db.service")]
    current = [
        Assignment("db.service", A, jobs[0][1].hash, "launched"),
        Assignment("db-announce.service", A, jobs[1][1].hash, "launched"),
    ]
    p = plan([machine(B), machine(C)], jobs, current)
    assert where(p)["db.service"] == where(p)["db-announce.service"]
    assert p.decisions["db-announce.service"].kept is False


def test_machine_of_waits_for_unscheduled_target() -> None:
    jobs = [unit("db.service", state="inactive"), unit("db-announce.service", "MachineOf=db.service")]
    p = plan(three(), jobs, [])
    assert pending(p) == {"db-announce.service": "waiting for db.service to be scheduled"}


def test_mutual_machine_of_stays_pending() -> None:
    jobs = [unit("a.service", "MachineOf=b.service"), unit("b.service", "MachineOf=a.service")]
    p = plan(three(), jobs, [])
    assert p.assignments == ()
    assert pending(p) == {
        "a.service": "MachineOf cycle: a.service -> b.service -> a.service",
        "b.service": "MachineOf cycle: b.service -> a.service -> b.service",
    }


def test_global_unit_runs_on_every_matching_machine() -> None:
    machines = [machine(A, disk="ssd"), machine(B), machine(C, disk="ssd")]
    p = plan(
        machines, [unit("log.service", "Global=true\nMachineMetadata=disk=ssd")], [], detail={"log.service"}
    )
    assert sorted(a.machine_id for a in p.assignments) == [A, C]
    assert explain(p.decisions["log.service"])[0] == "log.service global: on 2 of 3 machines"


def test_global_unit_avoids_machines_with_conflicting_units() -> None:
    jobs = [unit("db.service"), unit("agent.service", "Global=true\nConflicts=db.service")]
    current = [Assignment("db.service", A, jobs[0][1].hash, "launched")]
    p = plan(three(), jobs, current)
    assert sorted(a.machine_id for a in p.assignments if a.unit == "agent.service") == [B, C]


def test_replacing_unit_takes_the_machine_and_moves_the_replaced_one() -> None:
    jobs = [unit("old.service"), unit("new.service", "Replaces=old.service")]
    current = [Assignment("old.service", B, jobs[0][1].hash, "launched")]
    p = plan(three(), jobs, current, detail={"old.service"})
    assert where(p)["new.service"] == B
    assert where(p)["old.service"] != B
    assert p.decisions["new.service"].reason == Reason("replaces", ("old.service",))
    assert str(p.decisions["new.service"].reason) == "replaces old.service there"
    assert filtered(p, "old.service")[B] == "replaced by new.service"


def test_replaced_unit_without_room_elsewhere_goes_pending() -> None:
    jobs = [unit("old.service"), unit("new.service", "Replaces=old.service")]
    current = [Assignment("old.service", A, jobs[0][1].hash, "launched")]
    p = plan([machine(A)], jobs, current)
    assert where(p) == {"new.service": A}
    assert pending(p) == {"old.service": "no machine fits: replaced by new.service on the only machine"}


def test_replaces_unscheduled_unit_places_normally() -> None:
    jobs = [unit("old.service", state="inactive"), unit("new.service", "Replaces=old.service")]
    p = plan(three(), jobs, [])
    assert where(p) == {"new.service": A}


def test_adding_a_machine_does_not_move_running_units() -> None:
    jobs = [unit(f"app{i}.service") for i in range(6)]
    before = plan(three(), jobs, [])
    after = plan([*three(), machine(D)], jobs, before.assignments)
    assert after.assignments == before.assignments
    assert all(d.kept for d in after.decisions.values())
    # The new machine is empty, so it is first in line for the next unit.
    more = plan([*three(), machine(D)], [*jobs, unit("late.service")], after.assignments)
    assert where(more)["late.service"] == D


def test_machine_death_reschedules_its_units() -> None:
    jobs = [unit(f"app{i}.service") for i in range(6)]
    before = plan(three(), jobs, [])
    after = plan([machine(A), machine(C)], jobs, before.assignments)
    assert B not in where(after).values()
    assert Counter(where(after).values()) == {A: 3, C: 3}
    survivors = {u for u, m in where(before).items() if m != B}
    assert {u: where(after)[u] for u in survivors} == {u: where(before)[u] for u in survivors}


def test_inactive_jobs_are_not_scheduled() -> None:
    jobs = [unit("idle.service", state="inactive"), unit("busy.service")]
    current = [Assignment("idle.service", A, jobs[0][1].hash, "launched")]
    p = plan(three(), jobs, current)
    assert where(p) == {"busy.service": A}
    assert "idle.service" not in p.decisions and "idle.service" not in p.pending


def test_stopping_a_unit_keeps_placement_and_updates_desired_state() -> None:
    job, u = unit("web.service")
    first = plan(three(), [(job, u)], [])
    stopped = Job(name=job.name, hash=job.hash, desired_state="loaded")
    (a,) = plan(three(), [(stopped, u)], first.assignments).assignments
    assert (a.machine_id, a.desired_state) == (first.assignments[0].machine_id, "loaded")


def test_explain_says_where_and_why() -> None:
    jobs = [unit(f"web@{i}.service", "Conflicts=web@*") for i in range(1, 3)]
    current = [
        Assignment("web@1.service", A, jobs[0][1].hash, "launched"),
        Assignment("x.service", B, "h", "launched"),
    ]
    p = plan(
        [machine(A), machine(B), machine(C)], [*jobs, unit("x.service")], current, detail={"web@2.service"}
    )
    assert explain(p.decisions["web@2.service"]) == [
        "web@2.service -> 3c4d0000... : least loaded (0 units)",
        "  excluded 1a2b0000... (conflicts with web@1.service)",
        "  candidate 3c4d0000... score 1.00",
        "  candidate 2b3c0000... score 0.50",
    ]
    assert explain(p.decisions["web@1.service"]) == ["web@1.service -> 1a2b0000... : kept where it runs"]


def test_explain_pending_unit() -> None:
    p = plan([], [unit("a.service")], [])
    assert explain(p.decisions["a.service"]) == ["a.service pending: no machines registered"]


# --- the indexed plan against the scan scheduler it replaced ---------------------------------


def random_cluster(seed: int) -> tuple[list[Machine], list[tuple[Job, Unit]], list[Assignment]]:
    """A small cluster with every scheduling option, some dead machines and stale assignments."""
    rng = random.Random(seed)
    ids = [f"{rng.randrange(16**6):06x}" + "0" * 26 for _ in range(rng.randint(0, 7))]
    machines = [
        machine(mid, **{k: rng.choice("ab") for k in ("role", "zone") if rng.random() < 0.7}) for mid in ids
    ]
    names = [
        rng.choice(["web@{}.service", "db{}.service", "app{}.service"]).format(i)
        for i in range(rng.randint(1, 25))
    ]
    jobs = []
    for name in names:
        options = []
        roll = rng.random()
        if roll < 0.1:
            options.append("Global=true")
        elif roll < 0.2 and ids:
            options.append(f"MachineID={rng.choice(ids + ['f' * 32])}")
        elif roll < 0.35:
            options.append(f"MachineOf={rng.choice(names)}")
        elif roll < 0.45:
            options.append(f"Replaces={rng.choice(names)}")
        if rng.random() < 0.3:
            options.append(f"MachineMetadata={rng.choice(['role', 'zone'])}={rng.choice('ab')}")
        if rng.random() < 0.3 and not any(o.startswith("Replaces") for o in options):
            options.append(f"Conflicts={rng.choice(['web@*', 'db*', 'app?.service', rng.choice(names)])}")
        jobs.append(
            unit(name, "\n".join(options), state=rng.choice(["launched", "launched", "loaded", "inactive"]))
        )
    dead = "d" * 32
    current = [
        Assignment(job.name, rng.choice([*ids, dead]), job.hash, job.desired_state)
        for job, _ in jobs
        if rng.random() < 0.5
    ]
    return machines, jobs, current


@pytest.mark.parametrize("class_heap", [1, scheduler.CLASS_HEAP])
def test_indexed_plan_matches_the_scan_scheduler_on_random_clusters(
    monkeypatch, class_heap, random_cases
) -> None:
    monkeypatch.setattr(scheduler, "CLASS_HEAP", class_heap)
    for seed in range(random_cases):
        machines, jobs, current = random_cluster(seed)
        names = {job.name for job, _ in jobs}
        old = scheduler_oracle.plan(machines, jobs, current)
        new = plan(machines, jobs, current)
        assert new.assignments == old.assignments, seed
        assert pending(new) == dict(old.pending), seed
        for name, was in old.decisions.items():
            now = new.decisions[name]
            assert (now.machine_id, now.kept, str(now.reason)) == (was.machine_id, was.kept, was.reason), seed
        detailed = plan(machines, jobs, current, detail=names)
        assert detailed.assignments == old.assignments, seed
        for name, was in old.decisions.items():
            assert explain(detailed.decisions[name]) == scheduler_oracle.explain(was), (seed, name)


def test_indexed_plan_matches_the_scan_scheduler_in_steady_state(random_cases) -> None:
    for seed in range(random_cases // 4):
        machines, jobs, _ = random_cluster(seed)
        first = plan(machines, jobs, [])
        survivors = machines[: len(machines) // 2 + 1]
        old = scheduler_oracle.plan(survivors, jobs, first.assignments)
        new = plan(survivors, jobs, first.assignments)
        assert new.assignments == old.assignments, seed
        assert pending(new) == dict(old.pending), seed
