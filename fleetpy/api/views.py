"""Pure mapping from registry records to the API's JSON entities (no I/O, easy to test).

currentState follows fleet: it is what the machine running the unit reports, not what the user
asked for. fleetpy derives it from the schedule and the agents' published systemd states:

- "inactive": the unit is not scheduled on a live machine, or that machine's agent has not yet
  published a state for it with the scheduled content (hash).
- "launched": the agent reports it active, activating or reloading — or failed while fleet is
  meant to keep it launched, since fleet's "launched" means "started", whatever came of it.
- "loaded": any other published state (loaded into systemd, not running).

A global unit has no machineID; its currentState is the least advanced over its machines.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from fleetpy.registry.models import Assignment, Job, Machine, UnitState
from fleetpy.unit import UnitFile

_ORDER = {"inactive": 0, "loaded": 1, "launched": 2}
_RUNNING = frozenset({"active", "activating", "reloading"})


def machine_state(assignment: Assignment, published: UnitState | None) -> str:
    """The fleet-level state of one scheduled copy of a unit."""
    if published is None or (published.hash and published.hash != assignment.hash):
        return "inactive"
    if published.active_state in _RUNNING:
        return "launched"
    if published.active_state == "failed" and assignment.desired_state == "launched":
        return "launched"
    return "loaded"


def unit_entity(
    job: Job,
    unit_file: UnitFile | None,
    is_global: bool,
    assignments: Iterable[Assignment],
    states: Mapping[tuple[str, str], UnitState],
    alive: set[str],
) -> dict:
    """The API's Unit entity for `job`; `states` is keyed by (unit, machine id)."""
    live = [a for a in assignments if a.unit == job.name and a.machine_id in alive]
    per_machine = [machine_state(a, states.get((a.unit, a.machine_id))) for a in live]
    current = min(per_machine, key=_ORDER.__getitem__) if per_machine else "inactive"
    entity = {
        "name": job.name,
        "options": unit_file.to_options() if unit_file else [],
        "desiredState": job.desired_state,
        "currentState": current,
        # fleetpy's extension (Go fleetctl ignores it): clients need not parse [X-Fleet] again.
        "global": is_global,
    }
    if live and not is_global:
        entity["machineID"] = live[0].machine_id
    return entity


def machine_entity(machine: Machine) -> dict:
    entity = {"id": machine.id, "primaryIP": machine.public_ip, "metadata": dict(machine.metadata)}
    if machine.cordoned:
        entity["cordoned"] = True  # fleetpy's extension: `fleetctl drain` keeps units off it
    # fleetpy's extensions: what units may reserve there, and its live facts.
    if machine.capacity:
        entity["capacity"] = dict(machine.capacity)
    if machine.facts:
        entity["facts"] = dict(machine.facts)
    if machine.shared_volumes:
        entity["sharedVolumes"] = True  # it can run units with a Volume=NAME:shared
    return entity
