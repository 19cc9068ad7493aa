"""The scheduler behind an error boundary: units it fails on are set apart, the rest planned."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING

from fleetpy.engine import scheduler
from fleetpy.engine.scheduler import Plan
from fleetpy.registry.models import Assignment, Job, Machine

if TYPE_CHECKING:
    from fleetpy.unit import Unit


def plan_guarded(
    machines: Sequence[Machine],
    jobs: Sequence[tuple[Job, Unit]],
    current: Sequence[Assignment],
    detail: Collection[str] = (),
    volumes: Mapping[str, str] | None = None,
    avoided: Mapping[str, Mapping[str, int]] | None = None,
    moving: Mapping[str, tuple[str, str]] | None = None,
) -> tuple[Plan, dict[str, Exception]]:
    """`scheduler.plan`, and the units it fails on (with the error) left out instead of failing.

    Only when the whole plan fails are units tried one by one (in order, each added to those
    already fine), so finding the culprits costs something only when there is one.
    """
    volumes, avoided, moving = volumes or {}, avoided or {}, moving or {}
    try:
        return scheduler.plan(machines, jobs, current, detail, volumes, avoided, moving), {}
    except Exception:  # noqa: BLE001 - narrowed below to the units that cause it
        pass
    fine: list[tuple[Job, Unit]] = []
    failed: dict[str, Exception] = {}
    for job, unit in jobs:
        try:
            scheduler.plan(machines, [*fine, (job, unit)], current, (), volumes, avoided, moving)
            fine.append((job, unit))
        except Exception as error:  # noqa: BLE001 - that unit is a culprit
            failed[job.name] = error
    return scheduler.plan(machines, fine, current, detail, volumes, avoided, moving), failed
