"""Why a unit runs where it runs (or nowhere): a pure replay of the scheduler for one unit.

The API calls it with what it read from the registry; it needs no engine and does no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from fleetpy.engine.scheduler import explain, plan, short_id
from fleetpy.registry.models import Assignment, Job, Machine

if TYPE_CHECKING:
    from fleetpy.unit import Unit


def explain_placement(
    name: str,
    machines: Sequence[Machine],
    units: Sequence[tuple[Job, Unit]],
    current: Sequence[Assignment],
) -> list[str]:
    """The scheduler's steps for `name`, replayed on the given cluster.

    The unit's own placement is left out of the replay, so every machine is weighed again
    instead of the unit being simply "kept where it runs".
    """
    decision = plan(machines, units, [a for a in current if a.unit != name]).decisions.get(name)
    if decision is None:
        return [f"{name} is not scheduled: its desired state is inactive"]
    placed = sorted(short_id(a.machine_id) for a in current if a.unit == name)
    return explain(decision) + [f"  now on {', '.join(placed) if placed else 'no machine'}"]
