"""Drained machines: which ones take no new units, and the hand-over of the units they run.

`fleetctl drain` writes cordon/<machine id>; the registry lays it over the machine's record.
The scheduler (`scheduler.cordon_filter`) then keeps new units off the machine and no longer
keeps the units there, so the plan moves them. `hand_over` makes the move graceful: the old
copy stays assigned until the new copy is active, unless running twice is not allowed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from fleetpy.registry.models import Assignment, Machine, UnitState

if TYPE_CHECKING:
    from fleetpy.unit import Unit


def drained(machine: Machine) -> bool:
    return machine.cordoned


def hand_over(
    planned: Sequence[Assignment],
    current: Iterable[Assignment],
    states: Mapping[tuple[str, str], UnitState],
    machines: Iterable[Machine],
    units: Mapping[str, Unit],
) -> tuple[list[Assignment], set[str]]:
    """The plan's assignments plus the old copies on drained machines still handing over,
    and the names of the units handing over.

    A unit moved off a drained machine keeps its old copy until its new copy reports active
    with the planned content (Conflicts never stand in the way: they bind units on one
    machine, and the copies are on two). It does not when the unit may never run twice
    (`Fence=true`) or was not meant to run (loaded only). A unit the plan placed nowhere is
    not kept either: a drain takes units off the machine even when they must wait.
    """
    closed = {m.id for m in machines if drained(m)}
    new_home = {a.unit: a for a in planned}
    wanted = list(planned)
    handing: set[str] = set()
    for old in current:
        target = new_home.get(old.unit)
        unit = units.get(old.unit)
        if (
            old.machine_id not in closed
            or target is None
            or unit is None
            or target.machine_id == old.machine_id
        ):
            continue
        if old.desired_state != "launched" or unit.fleet.fence:
            continue
        state = states.get((target.unit, target.machine_id))
        if state is not None and state.active_state == "active" and state.hash == target.hash:
            continue
        wanted.append(old)
        handing.add(old.unit)
    return wanted, handing
