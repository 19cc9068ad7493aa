"""Moving a unit whose health check keeps failing: which machines to keep which unit off.

The agent restarts a unit whose health check fails (fleetpy.agent.health.judge) until it has
restarted it HealthCheckMoveAfter times on its machine; when the check fails again it leaves the
unit unhealthy, with that count in the state it publishes. The engine leader then records the
machine as avoided for that unit (avoid/<unit>/<machine>, written by the engine alone), and the
scheduler's health_filter keeps the unit off it, so the plan moves it.

An avoidance holds for the content that failed: it ends when the unit is destroyed, or gets new
content (a replace, or a destroy and a submit of another file). A new version is the usual cure
for a failing check, and a destroy is the user saying to forget the unit; anything looser, such
as a timeout, would send the same content back to a machine where it failed, to fail again.

Pure functions; the engine does the reading and writing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from fleetpy.registry.models import Assignment, Avoidance, Job, UnitState

if TYPE_CHECKING:
    from fleetpy.unit import Unit

# A unit's parse by (name, hash), or None when it is not known (yet).
UnitLookup = Callable[[str, str], "Unit | None"]


def exhausted(state: UnitState, unit: Unit | None) -> bool:
    """Whether `state` says the unit's check failed after every restart its machine allows."""
    health = state.health
    if health is None or health.status != "unhealthy":
        return False
    check = unit.fleet.health if unit is not None else None
    return check is not None and check.exhausted(health.restarts)


def worth_noting(text: str, lookup: UnitLookup) -> bool:
    """Whether a published state record (its JSON text) may call for a move.

    The engine's copy of the registry skips states: it is asked this of each one it sees, so it
    must be cheap, and say yes only for a state that reached its unit's HealthCheckMoveAfter.
    A unit the engine has not parsed yet (a new leader's first listing) counts when it was
    restarted at all: the pass that follows decides with the unit at hand.
    """
    if '"unhealthy"' not in text:
        return False
    state = UnitState.from_json(json.loads(text))
    unit = lookup(state.unit, state.hash)
    if unit is None:
        return state.health is not None and state.health.status == "unhealthy" and state.health.restarts > 0
    return exhausted(state, unit)


def new_avoidances(
    states: Iterable[UnitState],
    current: Iterable[Assignment],
    units: Mapping[str, tuple[Job, Unit]],
    avoided: Iterable[Avoidance],
) -> list[Avoidance]:
    """The machines to keep units off from now on: where a unit runs, with the content its job
    has, and its state says its check failed after its last allowed restart there."""
    placed = {(a.unit, a.machine_id): a.hash for a in current}
    known = {(a.unit, a.machine_id) for a in avoided}
    found: dict[tuple[str, str], Avoidance] = {}
    for state in states:
        key = (state.unit, state.machine_id)
        job_unit = units.get(state.unit)
        if key in known or job_unit is None or state.health is None:
            continue
        job, unit = job_unit
        if placed.get(key) != job.hash or state.hash != job.hash or not exhausted(state, unit):
            continue
        found[key] = Avoidance(
            state.unit, state.machine_id, state.hash, state.health.restarts, state.health.message
        )
    return [found[key] for key in sorted(found)]


def stale_avoidances(avoided: Iterable[Avoidance], jobs: Iterable[Job]) -> list[Avoidance]:
    """Avoidances that no longer hold: their unit is destroyed or has other content now."""
    hashes = {job.name: job.hash for job in jobs}
    return [a for a in avoided if hashes.get(a.unit) != a.hash]


def avoided_machines(avoided: Iterable[Avoidance], jobs: Iterable[Job]) -> dict[str, dict[str, int]]:
    """What the scheduler takes: unit -> machine -> restarts there, for the avoidances that hold."""
    hashes = {job.name: job.hash for job in jobs}
    machines: dict[str, dict[str, int]] = {}
    for a in avoided:
        if hashes.get(a.unit) == a.hash:
            machines.setdefault(a.unit, {})[a.machine_id] = a.restarts
    return machines
