"""What the engine's passes mean as events: machines lost, units scheduled, moved or pending."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from fleetpy.conf import metrics
from fleetpy.conf.values import machine_id_prefix
from fleetpy.events import kinds
from fleetpy.events.recorder import Recorder
from fleetpy.registry import Assignment, Machine, StoreError, VolumeMove


class Decision(Protocol):
    """What these events read of the scheduler's decision about a unit."""

    reason: object
    filtered: Mapping[str, object]


log = logging.getLogger(__name__)

OUTCOMES = {kinds.UNIT_SCHEDULED: "scheduled", kinds.UNIT_MOVED: "moved", kinds.UNIT_PENDING: "pending"}
# How long the event history of a machine gone (lost, or left) stays in etcd; its MachineLost
# stays longer, in the history of the leader that recorded it.
RETENTION = 24 * 3600.0
# The leader lists which machines have a history at most this often (a fraction of the
# retention): the listing reads every history, while each pass already knows who is alive.
MAX_LISTING_INTERVAL = 3600.0


@dataclass(frozen=True)
class Change:
    """One event to record: kind, message and what it is about."""

    kind: str
    message: str
    unit: str = ""
    machine_id: str = ""


def machine_changes(
    known: Iterable[str], machines: Iterable[Machine], reported: set[str], ttl: float
) -> list[Change]:
    """Known machines without a heartbeat that were not yet reported lost."""
    alive = {m.id for m in machines}
    return [
        Change(
            kinds.MACHINE_LOST,
            f"machine {machine_id_prefix(mid)} lost: no heartbeat within its {ttl:g}s TTL",
            machine_id=mid,
        )
        for mid in sorted(set(known) - alive - reported)
    ]


def expired_histories(
    reporters: Iterable[str],
    alive: set[str],
    missing_since: Mapping[str, float],
    now: float,
    retention: float,
) -> tuple[list[str], dict[str, float]]:
    """The histories to remove, of machines missing for `retention` or longer, and when each
    machine missing was first seen so (`missing_since`, updated: a machine back is forgotten)."""
    since = {r: missing_since.get(r, now) for r in reporters if r not in alive}
    return sorted(r for r, first in since.items() if now - first >= retention), since


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
                        f"{unit} moved from {machine_id_prefix(source)} ({_why_left(source, alive, decision)}) "
                        f"to {machine_id_prefix(target)}" + (f": {why}" if why else ""),
                        unit,
                        target,
                    )
                )
            else:
                changes.append(
                    Change(
                        kinds.UNIT_SCHEDULED,
                        f"{unit} scheduled to {machine_id_prefix(target)}" + (f": {why}" if why else ""),
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
    """The engine's events; without a recorder given, they are only kept in memory.

    The leader also removes the histories of machines gone for `retention` seconds (by `clock`;
    0 keeps them for ever), so etcd does not keep one per machine that ever existed.
    """

    def __init__(
        self,
        recorder: Recorder | None = None,
        ttl: float = 10.0,
        retention: float = RETENTION,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.recorder = recorder or Recorder()
        self.ttl = ttl
        self.retention = retention
        self.clock = clock
        self._seen: set[str] = set()
        self._lost: set[str] = set()
        self._reporters: set[str] | None = None  # machines with a history, as last listed
        self._listed_at = 0.0
        self._missing_since: dict[str, float] = {}

    def leading(self, machine_id: str) -> None:
        """This machine won the lease: machines are known again from its own passes."""
        self._seen, self._lost = set(), set()
        # Times are this leader's own: a machine's time gone starts again with each leader.
        self._reporters, self._missing_since = None, {}
        metrics.LEADER_CHANGES.inc()
        self.recorder.emit(
            kinds.LEADER_CHANGED,
            f"machine {machine_id_prefix(machine_id)} leads the engine",
            machine_id=machine_id,
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

    def volume_move_failed(self, name: str, move: VolumeMove, reason: str) -> None:
        self.recorder.emit(
            kinds.VOLUME_MOVE_FAILED, kinds.volume_move_failed(name, move, reason), machine_id=move.target
        )

    async def expire_histories(self, alive: set[str]) -> None:
        """Remove the histories of machines missing for the retention period, and their volume
        doorbells (a machine gone that long answers none); call it on every pass of the leader
        with the machines alive. Never raises: what fails is tried next pass."""
        registry = self.recorder.registry
        if not self.retention or registry is None:
            return
        try:
            now = self.clock()
            if self._reporters is None or now - self._listed_at >= min(
                self.retention / 4, MAX_LISTING_INTERVAL
            ):
                self._reporters, self._listed_at = set(await registry.event_reporters()), now
            expired, self._missing_since = expired_histories(
                self._reporters, alive, self._missing_since, now, self.retention
            )
            for machine_id in expired:
                await registry.forget_volume_doorbells(machine_id)
                await registry.delete_events(machine_id)
                self._reporters.discard(machine_id)
                log.info(
                    "engine: removed the event history and volume doorbells of machine %s, gone for %gs or more",
                    machine_id,
                    self.retention,
                )
        except StoreError as error:
            log.warning("engine: cannot remove old event histories now: %s", error)
        except Exception:  # noqa: BLE001 - housekeeping must never stop scheduling
            log.exception("engine: cannot remove old event histories")
