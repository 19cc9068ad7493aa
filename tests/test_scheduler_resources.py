"""Resource requests, strategies and fact constraints in the scheduling core, as pure data."""

from __future__ import annotations

import dataclasses
import random

import pytest
import scheduler_oracle
from test_scheduler import A, B, C, explain, filtered, pending, random_cluster, unit, where

from fleetpy.engine import scheduler
from fleetpy.engine.scheduler import plan
from fleetpy.registry.models import Assignment, Job, Machine
from fleetpy.unit import load_unit

GIB = 1024**3


def sized(mid: str, memory_gib: float, cpus: float = 4.0, **facts) -> Machine:
    return Machine(id=mid, capacity={"memory": memory_gib * GIB, "cpus": cpus}, facts=facts)


def test_a_unit_larger_than_every_machine_is_pending_with_what_is_short() -> None:
    machines = [sized(A, 1), sized(B, 1.5), sized(C, 1.2)]
    p = plan(machines, [unit("big.service", "MemoryRequest=2G")], [], detail={"big.service"})
    assert where(p) == {}
    assert pending(p) == {
        "big.service": "no machine fits: not enough memory (needs 2 GiB, the best has 1.5 GiB free) "
        "on all 3 machines"
    }
    assert filtered(p, "big.service")[B] == "not enough memory (needs 2 GiB, 1.5 GiB free)"


def test_requests_from_systemds_memorymax_and_cpuquota_count_too() -> None:
    u = load_unit("limited.service", "[Service]\nExecStart=/bin/true\nMemoryMax=3G\nCPUQuota=300%\n")
    job = (Job("limited.service", u.hash, "launched"), u)
    p = plan([sized(A, 2, cpus=8), sized(B, 8, cpus=2)], [job], [])
    assert pending(p) == {
        "limited.service": "no machine fits: not enough cpus (needs 3 CPUs, the best has 2 CPUs free); "
        "not enough memory (needs 3 GiB, the best has 2 GiB free) on all 2 machines"
    }
    assert where(plan([sized(A, 3, cpus=3)], [job], [])) == {"limited.service": A}


def test_the_scheduler_never_overcommits_a_machine() -> None:
    jobs = [unit(f"app{i}.service", "MemoryRequest=1G") for i in range(7)]
    p = plan([sized(A, 2), sized(B, 3)], jobs, [])
    assert sorted(where(p).values()) == [A, A, B, B, B]
    assert len(p.pending) == 2
    assert all(r.code == "no-fit" for r in p.pending.values())


def test_a_machine_without_capacity_takes_no_unit_that_requests_some() -> None:
    p = plan([Machine(A), sized(B, 1)], [unit("x.service", "MemoryRequest=2G")], [], detail={"x.service"})
    assert filtered(p, "x.service") == {
        A: "advertises no memory capacity",
        B: "not enough memory (needs 2 GiB, 1 GiB free)",
    }
    # Units that request nothing go anywhere, as before.
    assert where(plan([Machine(A)], [unit("y.service")], [])) == {"y.service": A}


def three_that_fit_only_by_binpack(strategy: str) -> list:
    options = f"Strategy={strategy}\n" if strategy else ""
    return [
        unit("a1.service", options + "MemoryRequest=2G"),
        unit("a2.service", options + "MemoryRequest=2G"),
        unit("a3.service", options + "MemoryRequest=4G"),
    ]


def test_spread_is_the_default_and_leaves_no_room_for_the_large_unit() -> None:
    p = plan([sized(A, 4), sized(B, 4)], three_that_fit_only_by_binpack(""), [])
    assert where(p) == {"a1.service": A, "a2.service": B}
    assert pending(p) == {
        "a3.service": "no machine fits: not enough memory (needs 4 GiB, the best has 2 GiB free) on all 2 machines"
    }
    assert where(plan([sized(A, 4), sized(B, 4)], three_that_fit_only_by_binpack("spread"), [])) == where(p)


def test_binpack_fills_the_fullest_machine_first_so_all_three_fit() -> None:
    p = plan([sized(A, 4), sized(B, 4)], three_that_fit_only_by_binpack("binpack"), [], detail={"a2.service"})
    assert where(p) == {"a1.service": A, "a2.service": A, "a3.service": B}
    assert pending(p) == {}
    lines = explain(p.decisions["a2.service"])
    assert lines[0] == "a2.service -> 1a2b0000... : fullest that fits (50% used)"
    assert lines[1:] == ["  candidate 1a2b0000... score 0.50", "  candidate 2b3c0000... score 0.00"]


def test_binpack_without_requests_goes_to_the_most_loaded_machine() -> None:
    jobs = [unit("a.service"), unit("b.service"), unit("c.service", "Strategy=binpack")]
    p = plan([Machine(A), Machine(B), Machine(C)], jobs, [])
    assert where(p)["c.service"] in (A, B)
    assert str(p.decisions["c.service"].reason) == "most loaded (1 unit)"


def test_constraints_on_live_facts_place_and_explain() -> None:
    machines = [
        sized(A, 4, load1=3.5, kernel="6.1.0-13-amd64", zone="a"),
        sized(B, 4, load1=0.4, kernel="4.19.0-1", zone="b"),
        sized(C, 4, load1=0.2, kernel="6.5.0", zone="c"),
    ]
    job = unit("fast.service", 'MachineConstraint="load1<2" "kernel>=5.10" "zone!={b,d}"')
    p = plan(machines, [job], [], detail={"fast.service"})
    assert where(p) == {"fast.service": C}
    assert filtered(p, "fast.service") == {
        A: "load1<2 does not hold (load1 is 3.5)",
        B: "kernel>=5.10 does not hold (kernel is 4.19.0-1)",
    }
    fast = plan(machines, [job], [])
    assert fast.assignments == p.assignments


def test_a_constraint_nothing_satisfies_is_pending_with_the_constraint() -> None:
    p = plan(
        [sized(A, 4, os="linux"), Machine(B)], [unit("x.service", "MachineConstraint=gpu==/^tesla/")], []
    )
    assert pending(p) == {"x.service": "no machine fits: gpu==/^tesla/ does not hold on all 2 machines"}


def test_metadata_wins_over_a_fact_of_the_same_name() -> None:
    m = Machine(A, metadata={"zone": "x"}, facts={"zone": "y"})
    assert where(plan([m], [unit("x.service", "MachineConstraint=zone==x")], [])) == {"x.service": A}


def test_a_placed_unit_stays_when_a_fact_later_breaks_its_constraint() -> None:
    job = unit("x.service", "MachineConstraint=load1<2")
    busy = [sized(A, 4, load1=5.0), sized(B, 4, load1=0.1)]
    current = [Assignment("x.service", A, job[1].hash, "launched")]
    p = plan(busy, [job], current)
    assert where(p) == {"x.service": A} and p.decisions["x.service"].kept
    assert where(plan(busy, [job], [])) == {"x.service": B}


def test_a_kept_unit_is_moved_when_its_machine_no_longer_has_room() -> None:
    jobs = [unit("a.service", "MemoryRequest=3G"), unit("b.service", "MemoryRequest=3G")]
    current = [Assignment(j.name, A, j.hash, "launched") for j, _ in jobs]
    p = plan([sized(A, 4), sized(B, 4)], jobs, current)
    assert where(p) == {"a.service": A, "b.service": B}


def test_a_running_global_keeps_its_room_and_a_kept_unit_that_no_longer_fits_moves() -> None:
    log, app = unit("log.service", "Global=true\nMemoryRequest=2G"), unit("app.service", "MemoryRequest=3G")
    current = [
        Assignment("log.service", A, log[1].hash, "launched"),
        Assignment("app.service", A, app[1].hash, "launched"),
    ]
    p = plan([sized(A, 4), sized(B, 8)], [log, app], current)
    assert sorted((a.unit, a.machine_id) for a in p.assignments) == [
        ("app.service", B),
        ("log.service", A),
        ("log.service", B),
    ]


def test_a_replacing_unit_takes_the_room_of_the_unit_it_replaces() -> None:
    old, new = (
        unit("old.service", "MemoryRequest=3G"),
        unit("new.service", "MemoryRequest=3G\nReplaces=old.service"),
    )
    current = [Assignment("old.service", A, old[0].hash, "launched")]
    p = plan([sized(A, 4), sized(B, 2)], [old, new], current, detail={"new.service"})
    assert where(p) == {"new.service": A}
    assert str(p.decisions["new.service"].reason) == "replaces old.service there"
    assert pending(p) == {
        "old.service": "0/2 machines fit: 1 not enough memory (needs 3 GiB, the best has 2 GiB free), "
        "1 replaced by new.service"
    }


def test_globals_run_only_where_they_fit_and_their_constraints_hold() -> None:
    machines = [sized(A, 4, arch="x86_64"), sized(B, 0.5, arch="x86_64"), sized(C, 4, arch="aarch64")]
    p = plan(
        machines, [unit("log.service", "Global=true\nMemoryRequest=1G\nMachineConstraint=arch==x86_64")], []
    )
    assert where(p) == {"log.service": A}


def test_units_that_use_no_new_option_are_placed_as_before() -> None:
    machines = [sized(A, 1, load1=9), Machine(B), sized(C, 0)]
    jobs = [unit(f"app{i}.service") for i in range(6)]
    assert [a.machine_id for a in plan(machines, jobs, []).assignments] == [A, B, C, A, B, C]


def random_resource_cluster(seed: int):
    rng = random.Random(seed)
    machines = [
        sized(f"{i:02d}" + "0" * 30, rng.choice([1, 2, 4]), rng.choice([1, 2]), load1=rng.choice([0.5, 3.0]))
        for i in range(rng.randint(1, 6))
    ]
    jobs = []
    for i in range(rng.randint(1, 14)):
        options = []
        if rng.random() < 0.6:
            options.append(f"MemoryRequest={rng.choice(['256M', '512M', '1G', '1.5G'])}")
        if rng.random() < 0.3:
            options.append(f"CPURequest={rng.choice(['0.5', '1', '150%'])}")
        if rng.random() < 0.4:
            options.append("Strategy=binpack")
        if rng.random() < 0.2:
            options.append("MachineConstraint=load1<1")
        if rng.random() < 0.1 and jobs:
            options.append(f"Replaces={rng.choice(jobs)[0].name}")
        elif rng.random() < 0.2:
            options.append("Conflicts=app*.service")
        if rng.random() < 0.1 and jobs:
            options.append(f"MachineOf={rng.choice(jobs)[0].name}")
        jobs.append(unit(f"app{i}.service", "\n".join(options)))
    return machines, jobs


@pytest.mark.parametrize("class_heap", [1, scheduler.CLASS_HEAP])
def test_the_indexed_plan_matches_the_full_pipeline_with_requests(
    monkeypatch, class_heap, random_cases
) -> None:
    monkeypatch.setattr(scheduler, "CLASS_HEAP", class_heap)
    for seed in range(random_cases):
        machines, jobs = random_resource_cluster(seed)
        names = {job.name for job, _ in jobs}
        fast = plan(machines, jobs, [])
        full = plan(machines, jobs, [], detail=names)
        assert fast.assignments == full.assignments, seed
        assert pending(fast) == pending(full), seed
        for name in names:
            assert str(fast.decisions[name].reason) == str(full.decisions[name].reason), (seed, name)
        for m in machines:
            used = sum(u.fleet.memory_request for j, u in jobs if where(fast).get(j.name) == m.id)
            assert used <= m.capacity["memory"], seed


def test_capacity_and_facts_change_nothing_for_units_that_do_not_ask(random_cases) -> None:
    """The frozen scan scheduler (no resources, no facts) still agrees once machines advertise them."""
    for seed in range(random_cases):
        machines, jobs, current = random_cluster(seed)
        rng = random.Random(seed)
        sized_machines = [
            dataclasses.replace(
                m,
                capacity={"cpus": rng.choice([1.0, 8.0]), "memory": rng.choice([0.5, 64]) * GIB},
                facts={"load1": rng.random() * 4, "os": "linux"},
            )
            for m in machines
        ]
        old = scheduler_oracle.plan(machines, jobs, current)
        new = plan(sized_machines, jobs, current, detail={job.name for job, _ in jobs})
        assert new.assignments == old.assignments, seed
        assert pending(new) == dict(old.pending), seed
        for name, was in old.decisions.items():
            assert explain(new.decisions[name]) == scheduler_oracle.explain(was), (seed, name)
