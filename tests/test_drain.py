"""Draining a machine, pure parts and the engine over the in-memory registry: the scheduler keeps
new units off a drained machine and moves its units, globals stay, reasons say "drained", the
old copy hands over to the new one, and the API's cordon record is what the scheduler reads."""

from __future__ import annotations

import asyncio
import dataclasses

from fleetpy.engine import engine as engine_module
from fleetpy.engine.cordon import hand_over
from fleetpy.engine.engine import Engine
from fleetpy.engine.explain import explain_placement
from fleetpy.engine.scheduler import plan
from fleetpy.registry import Assignment, Job, Machine, UnitState, memory_registry
from fleetpy.unit import UnitFile, load_unit

A = "1a2b" + "0" * 28
B = "2b3c" + "0" * 28
C = "3c4d" + "0" * 28


def unit(name: str, fleet: str = "", state: str = "launched") -> tuple[Job, object]:
    text = "[Service]\nExecStart=/bin/sleep infinity\n" + (f"[X-Fleet]\n{fleet}\n" if fleet else "")
    u = load_unit(name, text)
    return Job(name, u.hash, state), u


def machines(*drained: str) -> list[Machine]:
    return [Machine(id=m, cordoned=m in drained) for m in (A, B, C)]


def where(p) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for a in p.assignments:
        found.setdefault(a.unit, set()).add(a.machine_id)
    return found


def test_drained_machine_gets_no_new_units() -> None:
    p = plan(machines(A), [unit(f"app{i}.service") for i in range(4)], [])
    assert A not in {m for ms in where(p).values() for m in ms}
    assert p.pending == {}


def test_units_on_a_drained_machine_move_and_others_stay() -> None:
    jobs = [unit("a.service"), unit("b.service")]
    current = [
        Assignment("a.service", A, jobs[0][0].hash, "launched"),
        Assignment("b.service", B, jobs[1][0].hash, "launched"),
    ]
    p = plan(machines(A), jobs, current)
    assert where(p) == {"a.service": {C}, "b.service": {B}}


def test_pinned_unit_on_a_drained_machine_is_pending_with_the_reason() -> None:
    job = unit("pinned.service", f"MachineID={A}")
    p = plan(machines(A), [job], [Assignment("pinned.service", A, job[0].hash, "launched")])
    assert where(p) == {}
    assert (
        str(p.pending["pinned.service"])
        == "0/3 machines fit: 2 MachineID is 1a2b0000..., 1 machine is drained"
    )


def test_every_machine_drained_says_so() -> None:
    p = plan(machines(A, B, C), [unit("x.service")], [])
    assert str(p.pending["x.service"]) == "no machine fits: machine is drained on all 3 machines"


def test_global_units_stay_on_drained_machines() -> None:
    p = plan(machines(A), [unit("logger.service", "Global=true")], [])
    assert where(p) == {"logger.service": {A, B, C}}


def test_explain_names_the_drained_machine() -> None:
    job = unit("a.service")
    lines = explain_placement("a.service", machines(A), [job], [])
    assert "  excluded 1a2b0000... (machine is drained)" in lines


def test_unit_handing_over_stays_on_its_new_machine_not_the_drained_one() -> None:
    # Both copies are assigned while handing over; the plan keeps the new one, not the lower id.
    job = unit("a.service")
    current = [Assignment("a.service", m, job[0].hash, "launched") for m in (A, C)]
    p = plan(machines(A), [job], current)
    assert where(p) == {"a.service": {C}}
    assert p.decisions["a.service"].kept


def _handover(state: UnitState | None, fleet: str = "", desired: str = "launched"):
    job, u = unit("a.service", fleet, desired)
    old = Assignment("a.service", A, job.hash, desired)
    new = Assignment("a.service", B, job.hash, desired)
    states = {} if state is None else {("a.service", B): dataclasses.replace(state, hash=job.hash)}
    return hand_over([new], [old], states, machines(A), {"a.service": u}), old, new


def _state(active: str) -> UnitState:
    return UnitState("a.service", B, "", "loaded", active, "running" if active == "active" else "dead")


def test_old_copy_stays_until_the_new_copy_is_active() -> None:
    (wanted, handing), old, new = _handover(None)
    assert (wanted, handing) == ([new, old], {"a.service"})
    (wanted, handing), old, new = _handover(_state("activating"))
    assert (wanted, handing) == ([new, old], {"a.service"})
    (wanted, handing), old, new = _handover(_state("active"))
    assert (wanted, handing) == ([new], set())


def test_fenced_or_loaded_units_do_not_overlap() -> None:
    (wanted, handing), _, new = _handover(None, "Fence=true")
    assert (wanted, handing) == ([new], set())
    (wanted, handing), _, new = _handover(None, desired="loaded")
    assert (wanted, handing) == ([new], set())


def test_unit_with_nowhere_to_go_leaves_the_drained_machine() -> None:
    job, u = unit("a.service")
    old = Assignment("a.service", A, job.hash, "launched")
    assert hand_over([], [old], {}, machines(A), {"a.service": u}) == ([], set())


async def _until(predicate, timeout=3.0):
    async def check():
        while not await predicate():
            await asyncio.sleep(0.002)

    await asyncio.wait_for(check(), timeout)


async def test_engine_hands_over_on_cordon_and_uncordon_lets_units_back(monkeypatch) -> None:
    # The engine looks this often whether a new copy runs yet: a few looks fit in a short wait.
    monkeypatch.setattr(engine_module, "HANDOVER_POLL", 0.002)
    registry = memory_registry()
    for mid in (A, B):
        await registry.register_machine(Machine(id=mid), ttl=60)
    digest = await registry.put_unit_file(UnitFile.parse("[Service]\nExecStart=/bin/true\n"))
    await registry.create_job(Job("a.service", digest, "launched"))
    engine = Engine(registry, A, lease_ttl=5)
    task = asyncio.create_task(engine.run())

    async def placed() -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for a in await registry.assignments():
            found.setdefault(a.unit, set()).add(a.machine_id)
        return found

    try:
        await _until(lambda: _eq(placed, {"a.service": {A}}))
        await registry.set_cordon(A, True)
        assert [m.cordoned for m in await registry.machines()] == [True, False]
        # The new copy is assigned beside the old one until it reports active.
        await _until(lambda: _eq(placed, {"a.service": {A, B}}))
        await asyncio.sleep(4 * engine_module.HANDOVER_POLL)
        assert await placed() == {"a.service": {A, B}}
        await registry.publish_state(UnitState("a.service", B, digest, "loaded", "active", "running"))
        await _until(lambda: _eq(placed, {"a.service": {B}}))
        await registry.set_cordon(A, False)
        assert [m.cordoned for m in await registry.machines()] == [False, False]
        # Moved units stay where they went; new ones may use the machine again.
        await registry.create_job(Job("b.service", digest, "launched"))
        await _until(lambda: _eq(placed, {"a.service": {B}, "b.service": {A}}))
    finally:
        task.cancel()


async def _eq(read, expected) -> bool:
    return await read() == expected
