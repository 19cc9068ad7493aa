"""What the engine's passes mean as events: machines lost, units scheduled, moved or pending."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from fleetpy.conf import metrics
from fleetpy.events import kinds
from fleetpy.events.recorder import Recorder
from fleetpy.registry import Assignment, Machine


class Decision(Protocol):
    """What these events read of the scheduler's decision about a unit."""

    reason: object
    filtered: Mapping[str, object]


log = logging.getLogger(__name__)

OUTCOMES = {kinds.UNIT_SCHEDULED: "scheduled", kinds.UNIT_MOVED: "moved", kinds.UNIT_PENDING: "pending"}


@dataclass(frozen=True)
class Change:
    """One event to record: kind, message and what it is about."""

    kind: str
    message: str
    unit: str = ""
    machine_id: str = ""


def short(machine_id: str) -> str:
    return machine_id[:8]


def machine_changes(
    known: Iterable[str], machines: Iterable[Machine], reported: set[str], ttl: float
) -> list[Change]:
    """Known machines without a heartbeat that were not yet reported lost."""
    alive = {m.id for m in machines}
    return [
        Change(
            kinds.MACHINE_LOST,
            f"machine {short(mid)} lost: no heartbeat within its {ttl:g}s TTL",
            machine_id=mid,
        )
        for mid in sorted(set(known) - alive - reported)
    ]


def schedule_changes(
    before: Sequence[Assignment],
    after: Sequence[Assignment],
    decisions: Mapping[str, Decision],
    alive: set[str],
    reasons: Mapping[str, str],
    stored_reasons: Mapping[str, str],
) -> list[Change]:
    """Units placed on a machine (scheduled, or moved from another) and units newly pending."""
    was: dict[str, set[str]] = {}
    for a in before:
        was.setdefault(a.unit, set()).add(a.machine_id)
    now: dict[str, set[str]] = {}
    for a in after:
        now.setdefault(a.unit, set()).add(a.machine_id)
    changes = []
    for unit in sorted(now):
        decision = decisions.get(unit)
        why = str(decision.reason) if decision is not None else ""
        left = sorted(was.get(unit, set()) - now[unit])
        for target in sorted(now[unit] - was.get(unit, set())):
            if left:
                source = left.pop(0)
                changes.append(
                    Change(
                        kinds.UNIT_MOVED,
                        f"{unit} moved from {short(source)} ({_why_left(source, alive, decision)}) "
                        f"to {short(target)}" + (f": {why}" if why else ""),
                        unit,
                        target,
                    )
                )
            else:
                changes.append(
                    Change(
                        kinds.UNIT_SCHEDULED,
                        f"{unit} scheduled to {short(target)}" + (f": {why}" if why else ""),
                        unit,
                        target,
                    )
                )
    for unit, reason in sorted(reasons.items()):
        if stored_reasons.get(unit) != reason:
            changes.append(Change(kinds.UNIT_PENDING, f"{unit} pending: {reason}", unit))
    return changes


def _why_left(machine_id: str, alive: set[str], decision: Decision | None) -> str:
    if machine_id not in alive:
        return "machine gone"
    if decision is not None and machine_id in decision.filtered:
        return str(decision.filtered[machine_id])
    return "rebalanced"


class EngineEvents:
    """The engine's events; without a recorder given, they are only kept in memory."""

    def __init__(self, recorder: Recorder | None = None, ttl: float = 10.0):
        self.recorder = recorder or Recorder()
        self.ttl = ttl
        self._seen: set[str] = set()
        self._lost: set[str] = set()

    def leading(self, machine_id: str) -> None:
        """This machine won the lease: machines are known again from its own passes."""
        self._seen, self._lost = set(), set()
        metrics.LEADER_CHANGES.inc()
        self.recorder.emit(
            kinds.LEADER_CHANGED, f"machine {short(machine_id)} leads the engine", machine_id=machine_id
        )

    def scheduled(
        self,
        machines: Sequence[Machine],
        before: Sequence[Assignment],
        after: Sequence[Assignment],
        decisions: Mapping[str, Decision],
        reasons: Mapping[str, str],
        stored_reasons: Mapping[str, str],
    ) -> None:
        """Record what one pass changed: call it after the pass's writes succeeded."""
        try:
            alive = {m.id for m in machines}
            # A new leader has seen no pass before, yet when the old leader's own node died, that
            # node's units still name it: machines holding units are known too.
            known = self._seen | {a.machine_id for a in before}
            changes = machine_changes(known, machines, self._lost, self.ttl)
            changes += schedule_changes(before, after, decisions, alive, reasons, stored_reasons)
            self._lost = (self._lost | known) - alive
            self._seen = alive
        except Exception:  # noqa: BLE001 - events must never stop scheduling
            log.exception("engine: cannot derive events from this pass")
            return
        for change in changes:
            if change.kind in OUTCOMES:
                metrics.SCHEDULING_DECISIONS.inc(OUTCOMES[change.kind])
            self.recorder.emit(change.kind, change.message, unit=change.unit, machine_id=change.machine_id)
