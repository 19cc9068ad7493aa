"""Why a unit runs where it runs (or nowhere): a pure replay of the scheduler for one unit.

The API calls it with what it read from the registry; it needs no engine and does no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from fleetpy.conf.values import short_machine_id
from fleetpy.engine.guarded import plan_guarded
from fleetpy.engine.health import avoided_machines
from fleetpy.engine.scheduler import explain
from fleetpy.registry.models import Assignment, Avoidance, Job, Machine

if TYPE_CHECKING:
    from fleetpy.unit import Unit


def explain_placement(
    name: str,
    machines: Sequence[Machine],
    units: Sequence[tuple[Job, Unit]],
    current: Sequence[Assignment],
    pending: Mapping[str, str] | None = None,
    volumes: Mapping[str, str] | None = None,
    avoided: Sequence[Avoidance] = (),
    moving: Mapping[str, tuple[str, str]] | None = None,
) -> list[str]:
    """The scheduler's steps for `name`, replayed on the given cluster.

    The unit's own placement is left out of the replay, so every machine is weighed again
    instead of the unit being simply "kept where it runs". A unit the engine quarantined (its
    file does not load, or the scheduler fails on it) is explained by the reason the engine
    recorded in `pending`. `avoided` are the registry's avoidances (those that no longer hold
    for the units' content are left out here, as the engine does); `moving` the volumes moving.
    """
    others = [a for a in current if a.unit != name]
    machines_avoided = avoided_machines(avoided, [job for job, _ in units])
    new_plan, failed = plan_guarded(machines, units, others, {name}, volumes, machines_avoided, moving)
    decision = new_plan.decisions.get(name)
    placed = sorted(short_machine_id(a.machine_id) for a in current if a.unit == name)
    where = f"  now on {', '.join(placed) if placed else 'no machine'}"
    recorded = (pending or {}).get(name)
    if name in failed or (decision is None and recorded):
        return [f"{name} pending: {recorded or failed[name]}", where]
    if decision is None:
        return [f"{name} is not scheduled: its desired state is inactive"]
    return explain(decision) + [where]
