"""HealthCheckMoveAfter, fast parts: the key at the door, the agent that stops restarting after M
restarts, the scheduler's health filter and its reasons, and the engine leader that records the
machine as avoided and moves the unit (over the memory registry, directly and event-fed from its
mirror). The real version, on a lab cluster, is tests/test_health_move_lab.py."""

from __future__ import annotations

import json

import pytest

from fleetpy.agent.health import judge
from fleetpy.engine import scheduler
from fleetpy.engine.engine import Engine
from fleetpy.engine.explain import explain_placement
from fleetpy.engine.health import avoided_machines, new_avoidances, stale_avoidances, worth_noting
from fleetpy.events import EngineEvents
from fleetpy.events.recorder import Recorder
from fleetpy.registry import Assignment, Avoidance, Health, Job, Machine, UnitState, memory_registry
from fleetpy.unit import InvalidFleetOptions, UnitFile, load_unit, parse_fleet_options
from fleetpy.unit.fleet import HealthCheck
from tests.test_engine import _placed, _submit, _until
from tests.test_engine_mirror import CountedEngine, _settled
from tests.test_health import published, step

MOVING = "[Service]\nExecStart=/bin/sleep 1000\n[X-Fleet]\nHealthCheckTCP=81\nHealthCheckMoveAfter=2\n"


def fleet(body: str, name: str = "web.service"):
    return parse_fleet_options(name, UnitFile.parse("[Service]\nExecStart=/bin/true\n[X-Fleet]\n" + body))


# The door.
def test_move_after_is_read_and_absent_means_never() -> None:
    assert fleet("HealthCheckTCP=80\nHealthCheckMoveAfter=3\n").health.move_after == 3
    assert fleet("HealthCheckTCP=80\n").health.move_after == 0
    assert fleet("HealthCheckTCP=80\nHealthCheckMoveAfter=0\n").health.move_after == 0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "HealthCheckTCP=80\nHealthCheckMoveAfter=two\n",
            "HealthCheckMoveAfter='two': give how many restarts",
        ),
        ("HealthCheckTCP=80\nHealthCheckMoveAfter=-1\n", "1 to 100"),
        ("HealthCheckTCP=80\nHealthCheckMoveAfter=101\n", "1 to 100"),
        ("HealthCheckTCP=80\nHealthCheckMoveAfter=1 2\n", "must be one word"),
        ("HealthCheckMoveAfter=2\n", "without a check; add HealthCheckHTTP="),
        (
            "HealthCheckTCP=80\nHealthCheckAction=none\nHealthCheckMoveAfter=2\n",
            "counts the restarts of HealthCheckAction=restart",
        ),
        (
            "Global=true\nHealthCheckTCP=80\nHealthCheckMoveAfter=2\n",
            "Global=true cannot be combined with HealthCheckMoveAfter",
        ),
    ],
)
def test_bad_move_after_is_refused_with_what_to_write(body: str, message: str) -> None:
    with pytest.raises(InvalidFleetOptions, match=message):
        fleet(body)


# The agent's verdict: M restarts, then no more.
def test_after_move_after_restarts_the_unit_stays_unhealthy_and_is_not_restarted() -> None:
    check = HealthCheck("tcp", "127.0.0.1", 80, threshold=1, move_after=2)
    after, restart = judge(check, Health("starting", 0, 1), False, "refused", False)
    assert after == Health("unhealthy", 1, 1, "refused") and restart
    after, restart = judge(check, Health("starting", 0, 2), False, "refused", False)
    assert after == Health("unhealthy", 1, 2, "refused") and not restart
    # Without the key, restarts go on for ever.
    check = HealthCheck("tcp", "127.0.0.1", 80, threshold=1)
    assert judge(check, Health("starting", 0, 50), False, "refused", False)[1]


async def test_the_agent_restarts_m_times_then_leaves_the_unit_to_the_engine_and_says_so() -> None:
    from tests.test_health import _running_agent

    agent, systemd, clock, scripted, events = await _running_agent(
        {"web.service": "HealthCheckTCP=81\nHealthCheckThreshold=1\nHealthCheckMoveAfter=2"}
    )
    verdicts = []
    report = events.health

    def seen(name, before, after, check, restarting):
        verdicts.append((after.status, after.restarts, restarting))
        report(name, before, after, check, restarting)

    events.health = seen
    scripted.passing[81] = False
    jobs = len(systemd.jobs)
    for _ in range(6):
        await step(agent, clock, 10)
    assert systemd.jobs[jobs:].count(("start", "web.service")) == 2
    # An unhealthy verdict shows the restarts made before it: only the last one, after both,
    # shows 2, so the engine never moves a unit whose second restart is under way.
    assert verdicts == [("unhealthy", 0, True), ("unhealthy", 1, True), ("unhealthy", 2, False)]
    health = published(agent, "web.service")
    assert (health.status, health.restarts) == ("unhealthy", 2) and health.failures > 1
    (state,) = await agent._records({"web.service": await systemd.unit_state("web.service")})
    assert state.active_state == "active" and state.health.restarts == 2
    messages = [e.message for e in events.recorder.queued if e.kind == "UnitUnhealthy"]
    assert messages[-1].endswith(
        "not restarted here again after 2 restarts (HealthCheckMoveAfter=2): "
        "the engine moves it to another machine"
    ), messages
    assert messages[0].endswith("restarting it (restart 1)")


# The scheduler.
def _cluster(*ids: str) -> list[Machine]:
    return [Machine(mid) for mid in ids]


def _job(name: str = "web.service", text: str = MOVING) -> tuple[Job, object]:
    unit_file = UnitFile.parse(text)
    return Job(name, unit_file.hash, "launched"), load_unit(name, unit_file)


@pytest.mark.parametrize("detail", [(), ("web.service",)])
def test_an_avoided_machine_is_left_and_never_chosen(detail) -> None:
    job, unit = _job()
    current = [Assignment("web.service", "m1", job.hash, "launched")]
    avoided = {"web.service": {"m1": 2}}
    plan = scheduler.plan(_cluster("m1", "m2", "m3"), [(job, unit)], current, detail, avoided=avoided)
    (placed,) = plan.assignments
    assert placed.machine_id == "m2"
    # The move's reason, for the UnitMoved event, on the fast path too.
    assert (
        str(plan.decisions["web.service"].filtered["m1"]) == "failed its health check on m1 after 2 restarts"
    )


def test_a_unit_in_a_large_conflict_class_keeps_the_shared_heap_intact() -> None:
    # Eight instances share one heap; the avoided one's exclusion must not drop m1 for the others.
    text = MOVING + "Conflicts=web@*.service\n"
    jobs = [_job(f"web@{i}.service", text) for i in range(1, 9)]
    machines = _cluster(*(f"m{i}" for i in range(1, 10)))
    avoided = {"web@1.service": {mid: 2 for mid in ("m1", "m2", "m3")}}
    plan = scheduler.plan(machines, jobs, [], avoided=avoided)
    where = {a.unit: a.machine_id for a in plan.assignments}
    assert where["web@1.service"] not in ("m1", "m2", "m3")
    assert len(set(where.values())) == 8 and "m1" in where.values()


def test_every_machine_avoided_leaves_the_unit_pending_with_the_reason() -> None:
    job, unit = _job()
    avoided = {"web.service": {"m1": 2, "m2": 3}}
    plan = scheduler.plan(_cluster("m1", "m2"), [(job, unit)], [], avoided=avoided)
    assert not plan.assignments
    assert str(plan.pending["web.service"]) == (
        "no machine fits: its health check failed there "
        "(new content or a destroy and submit clears this) on all 2 machines"
    )
    plan = scheduler.plan(
        [Machine("m1"), Machine("m2"), Machine("m3", cordoned=True)], [(job, unit)], [], avoided=avoided
    )
    assert str(plan.pending["web.service"]).startswith("0/3 machines fit: 2 its health check failed there")


def test_explain_and_plan_name_the_avoided_machine_only_for_the_content_that_failed() -> None:
    job, unit = _job()
    current = [Assignment("web.service", "m2", job.hash, "launched")]
    avoided = [Avoidance("web.service", "m1", job.hash, 2, "TCP 127.0.0.1:81: refused")]
    lines = explain_placement("web.service", _cluster("m1", "m2"), [(job, unit)], current, avoided=avoided)
    assert "  excluded m1 (failed its health check on m1 after 2 restarts)" in lines, lines
    newer, newer_unit = _job(text=MOVING.replace("sleep 1000", "sleep 1001"))
    lines = explain_placement("web.service", _cluster("m1", "m2"), [(newer, newer_unit)], [], avoided=avoided)
    assert not any("excluded" in line for line in lines), lines


# The pure engine decisions.
def _state(restarts: int, status: str = "unhealthy", digest: str = "h", machine: str = "m1") -> UnitState:
    health = Health(status, 1, restarts, "TCP 127.0.0.1:81: refused")
    return UnitState("web.service", machine, digest, "loaded", "active", "running", "", health)


def test_only_a_state_at_move_after_with_the_running_content_calls_for_a_move() -> None:
    job, unit = _job()
    units = {"web.service": (job, unit)}
    current = [Assignment("web.service", "m1", job.hash, "launched")]
    assert new_avoidances([_state(1, digest=job.hash)], current, units, []) == []
    assert new_avoidances([_state(2, "starting", job.hash)], current, units, []) == []
    assert new_avoidances([_state(2, digest="old")], current, units, []) == []
    assert new_avoidances([_state(2, digest=job.hash, machine="m2")], current, units, []) == []
    (found,) = new_avoidances([_state(2, digest=job.hash)], current, units, [])
    assert found == Avoidance("web.service", "m1", job.hash, 2, "TCP 127.0.0.1:81: refused")
    assert new_avoidances([_state(2, digest=job.hash)], current, units, [found]) == []


def test_an_avoidance_ends_with_a_destroy_or_new_content() -> None:
    kept = Avoidance("web.service", "m1", "h1", 2)
    replaced = Avoidance("db.service", "m1", "old", 2)
    destroyed = Avoidance("gone.service", "m2", "h3", 2)
    jobs = [Job("web.service", "h1", "launched"), Job("db.service", "new", "launched")]
    assert stale_avoidances([kept, replaced, destroyed], jobs) == [replaced, destroyed]
    assert avoided_machines([kept, replaced, destroyed], jobs) == {"web.service": {"m1": 2}}


def test_the_mirror_notes_only_states_that_reached_their_units_move_after() -> None:
    job, unit = _job()

    def known(name, digest):
        return unit if (name, digest) == ("web.service", job.hash) else None

    def text(state):
        return json.dumps(state.to_json())

    healthy = UnitState("web.service", "m1", job.hash, "loaded", "active", "running", "", Health("healthy"))
    assert not worth_noting(text(healthy), known)
    assert not worth_noting(text(_state(1, digest=job.hash)), known)
    assert worth_noting(text(_state(2, digest=job.hash)), known)
    # A unit not parsed yet (a new leader's first listing): any restarted unhealthy unit, for the pass to decide.
    assert worth_noting(text(_state(1, digest="unknown")), known)
    assert not worth_noting(text(_state(0, digest="unknown")), known)


# The engine over the memory registry.
async def _moving_cluster():
    registry = memory_registry()
    for mid in ("m1", "m2", "m3"):
        await registry.register_machine(Machine(mid), ttl=60)
    digest = await _submit(registry, "web.service", MOVING)
    await registry.assign(Assignment("web.service", "m1", digest, "launched"))
    return registry, digest


async def _publish(registry, digest: str, restarts: int, machine: str = "m1") -> None:
    await registry.publish_state(_state(restarts, digest=digest, machine=machine))


async def test_the_leader_records_the_machine_and_moves_the_unit_with_the_reason() -> None:
    registry, digest = await _moving_cluster()
    events = EngineEvents(Recorder())
    engine = Engine(registry, "m1", lease_ttl=5, events=events)
    await _publish(registry, digest, 1)
    await engine.reconcile()
    assert await _placed(registry, {"web.service": "m1"}) and await registry.avoided() == []
    await _publish(registry, digest, 2)
    await engine.reconcile()
    assert await registry.avoided() == [
        Avoidance("web.service", "m1", digest, 2, "TCP 127.0.0.1:81: refused")
    ]
    ((unit, machine),) = [(a.unit, a.machine_id) for a in await registry.assignments()]
    assert unit == "web.service" and machine in ("m2", "m3")
    moved = [e.message for e in events.recorder.queued if e.kind == "UnitMoved"]
    assert moved == [
        f"web.service moved from m1 (failed its health check on m1 after 2 restarts) to {machine}: least loaded (0 units)"
    ]
    # A later leader keeps it off m1: the avoidance is in the registry, not in the old leader.
    await registry.unassign("web.service", machine)
    await registry.assign(Assignment("web.service", "m1", digest, "launched"))
    await Engine(registry, "m2", lease_ttl=5).reconcile()
    assert not await _placed(registry, {"web.service": "m1"})


async def test_every_machine_failing_leaves_the_unit_pending_until_new_content() -> None:
    registry, digest = await _moving_cluster()
    engine = Engine(registry, "m1", lease_ttl=5)
    for machine in ("m1", "m2", "m3"):
        for a in await registry.assignments():
            await registry.unassign(a.unit, a.machine_id)
        await registry.assign(Assignment("web.service", machine, digest, "launched"))
        await _publish(registry, digest, 2, machine)
        await engine.reconcile()
    assert await registry.assignments() == []
    assert "its health check failed there" in (await registry.pending())["web.service"]
    assert len(await registry.avoided()) == 3
    # New content: a new version may pass its check, so every machine is tried again.
    new = UnitFile.parse(MOVING.replace("sleep 1000", "sleep 1001"))
    await registry.submit(new, Job("web.service", new.hash, "launched"), replace=True)
    await engine.reconcile()
    assert await registry.avoided() == [] and len(await registry.assignments()) == 1
    assert "web.service" not in await registry.pending()


async def test_a_destroyed_unit_forgets_its_avoided_machines() -> None:
    registry, digest = await _moving_cluster()
    engine = Engine(registry, "m1", lease_ttl=5)
    await _publish(registry, digest, 2)
    await engine.reconcile()
    assert len(await registry.avoided()) == 1
    await registry.delete_job("web.service")
    await engine.reconcile()
    assert await registry.avoided() == []


async def test_event_fed_only_a_state_at_move_after_starts_a_pass_and_it_moves_the_unit(running) -> None:
    registry = memory_registry()
    for mid in ("m1", "m2"):
        await registry.register_machine(Machine(mid), ttl=60)
    engine = CountedEngine(registry, "m1", lease_ttl=5, reconcile_interval=3600)
    running(engine.run())
    digest = await _submit(registry, "web.service", MOVING)
    await _until(lambda: _placed(registry, {"web.service": "m1"}))
    await _settled(engine, registry)
    passes = engine.passes
    for restarts in (0, 1, 1):  # unhealthy, restarted fewer times than HealthCheckMoveAfter
        await _publish(registry, digest, restarts)
        await _settled(engine, registry)
    assert engine.passes == passes
    await _publish(registry, digest, 2)
    await _until(lambda: _placed(registry, {"web.service": "m2"}))
    assert [(a.unit, a.machine_id) for a in await registry.avoided()] == [("web.service", "m1")]


async def test_a_new_leader_moves_a_unit_whose_state_reached_move_after_before_it_led(running) -> None:
    # Its copy skips states, but notes this one in its first listing.
    registry, digest = await _moving_cluster()
    await _publish(registry, digest, 2)
    running(Engine(registry, "m2", lease_ttl=5, reconcile_interval=3600).run())
    await _until(lambda: _avoided(registry))
    assert not await _placed(registry, {"web.service": "m1"})
    assert len(await registry.assignments()) == 1


async def _avoided(registry):
    return bool(await registry.avoided())


@pytest.mark.parametrize("class_heap", [1, scheduler.CLASS_HEAP])
def test_the_indexed_plan_and_the_full_scan_agree_with_avoided_machines(
    monkeypatch, class_heap, random_cases
) -> None:
    import random

    from tests.test_scheduler import random_cluster

    monkeypatch.setattr(scheduler, "CLASS_HEAP", class_heap)
    for seed in range(random_cases):
        machines, jobs, current = random_cluster(seed)
        rng = random.Random(seed)
        ids = [m.id for m in machines]
        avoided = {
            job.name: {mid: 2 for mid in rng.sample(ids, rng.randint(1, len(ids)))}
            for job, unit in jobs
            if ids and not unit.fleet.is_global and rng.random() < 0.4
        }
        names = {job.name for job, _ in jobs}
        fast = scheduler.plan(machines, jobs, current, avoided=avoided)
        full = scheduler.plan(machines, jobs, current, detail=names, avoided=avoided)
        assert fast.assignments == full.assignments, seed
        assert {n: str(r) for n, r in fast.pending.items()} == {n: str(r) for n, r in full.pending.items()}, (
            seed
        )
        assert not [a for a in fast.assignments if a.machine_id in avoided.get(a.unit, {})], seed
