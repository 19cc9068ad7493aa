"""The steps of a local volume's move (`fleetctl volume move`), as pure changes of its record.

A move lives on the volume's own key, volumes/<name>, so that the step which hands the volume to
the target (`arrived`) is one compare-and-swap: there is never a moment when two machines hold
it, or none. Each party writes only its own steps, and only over the move it saw:

  API              start: stopping          (refused while another move is under way)
  source agent     stopping -> copying      once no unit using the volume runs there
  target agent     copying  -> done         with the data in place; the volume lives there now
  target agent     copying  -> failed       the copy failed; the volume stays on the source
  engine           stopping/copying -> failed   the source or target machine is gone

Each change function returns None when the record is not (or no longer) what it applies to, so
`Registry.update_volume` leaves it alone: a step that lost a race does nothing.

An agent watches only its own keys, so each step also rings the doorbells of the source and the
target, volume-moves/<machine>/<name>, with the record as the step left it: in the same
transaction on etcd v3; on v2 (no multi-key transaction) right after the compare-and-swap, so an
agent woken by its doorbell always finds the step in the record. A v2 writer that stops between
the two, or a move begun by a fleetd that rang no doorbells, leaves a machine untold: the engine
leader, which follows every record, rings its doorbell once that has lasted RING_AFTER (`untold`).
The record stays the truth; a doorbell only says "read it". Each agent removes its own doorbell
(compare-and-delete, so a newer step's stays) once its part of the move is over.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from fleetpy.conf.values import short_machine_id
from fleetpy.registry.models import (
    MOVE_COPYING,
    MOVE_DONE,
    MOVE_FAILED,
    MOVE_STOPPING,
    VolumeMove,
    VolumeRecord,
)

Change = Callable[[VolumeRecord | None], VolumeRecord | None]
# How long the engine leader lets a machine stay untold of its move's step before ringing its
# doorbell itself: a v2 writer rings right after its compare-and-swap, within a request's retries.
RING_AFTER = 10.0


class MoveRefused(Exception):
    """A move that cannot start; `kind` is "not-found" or "busy", for the API's status code."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def start(name: str, target: str, now: float) -> Change:
    """Start moving volume `name` to `target`; no change when it lives there already."""

    def change(record: VolumeRecord | None) -> VolumeRecord | None:
        if record is None:
            raise MoveRefused("not-found", f"volume {name} not found; see 'fleetctl list-volumes'")
        moving = record.moving
        if moving is not None:
            raise MoveRefused(
                "busy",
                f"volume {name} is already moving from {short_machine_id(moving.source)} to "
                f"{short_machine_id(moving.target)}",
            )
        if record.machine_id == target:
            return None
        return VolumeRecord(record.machine_id, VolumeMove(record.machine_id, target, MOVE_STOPPING, now))

    return change


def _step(seen: VolumeMove, state: str, make: Callable[[VolumeRecord], VolumeRecord]) -> Change:
    def change(record: VolumeRecord | None) -> VolumeRecord | None:
        if record is None or record.move != seen or seen.state != state:
            return None
        return make(record)

    return change


def serving(seen: VolumeMove) -> Change:
    """The source stopped every unit using the volume: the target may copy it."""
    return _step(
        seen,
        MOVE_STOPPING,
        lambda r: dataclasses.replace(r, move=dataclasses.replace(seen, state=MOVE_COPYING)),
    )


def arrived(seen: VolumeMove, now: float, size: int) -> Change:
    """The target holds the whole copy: the volume lives there from now on."""
    done = dataclasses.replace(seen, state=MOVE_DONE, finished=now, size=size)
    return _step(seen, MOVE_COPYING, lambda r: VolumeRecord(seen.target, done))


def failed_move(seen: VolumeMove, reason: str, now: float) -> VolumeMove:
    return dataclasses.replace(seen, state=MOVE_FAILED, finished=now, reason=reason)


def failed(seen: VolumeMove, reason: str, now: float) -> Change:
    """The move failed: the volume stays on its source, with the reason on the record."""

    def change(record: VolumeRecord | None) -> VolumeRecord | None:
        if record is None or record.move != seen or not seen.under_way:
            return None
        return dataclasses.replace(record, move=failed_move(seen, reason, now))

    return change


def where(records: Mapping[str, VolumeRecord]) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """What the scheduler reads of the records: the machine each volume lives on, and the
    (source, target) of each volume moving."""
    homes = {name: record.machine_id for name, record in records.items()}
    moving = {
        name: (record.moving.source, record.moving.target)
        for name, record in records.items()
        if record.moving is not None
    }
    return homes, moving


def stranded(records: Mapping[str, VolumeRecord], alive: Iterable[str]) -> dict[str, tuple[VolumeMove, str]]:
    """Moves under way that cannot finish because their source or target machine is gone, with why."""
    live = set(alive)
    found = {}
    for name, record in records.items():
        move = record.moving
        if move is None:
            continue
        if move.target not in live:
            found[name] = (move, f"target machine {short_machine_id(move.target)} is gone")
        elif move.source not in live:
            found[name] = (move, f"source machine {short_machine_id(move.source)} is gone")
    return found


def concerned(record: VolumeRecord) -> list[str]:
    """The machines whose doorbells a step of the record's move rings: its source and its target."""
    return [] if record.move is None else sorted({record.move.source, record.move.target})


@dataclass(frozen=True)
class Untold:
    """A machine whose doorbell of volume `name` does not hold the record `text` as it is now;
    `seen` is what it holds (None: there is none)."""

    machine_id: str
    name: str
    text: str
    seen: str | None


def _holds(doorbell: str | None, record: VolumeRecord) -> bool:
    try:
        return doorbell is not None and VolumeRecord.from_text(doorbell) == record
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


def untold(
    records: Mapping[str, VolumeRecord], doorbells: Mapping[tuple[str, str], str], alive: Iterable[str]
) -> list[Untold]:
    """The live machines a move concerns that were not told of its last step. While the move is
    under way, a doorbell must hold the record; once it ended, only a doorbell left over from an
    earlier step is untold (a missing one was answered: that machine's part is over)."""
    live = set(alive)
    found = []
    for name, record in sorted(records.items()):
        move = record.move
        if move is None:
            continue
        for machine_id in concerned(record):
            seen = doorbells.get((machine_id, name))
            if machine_id not in live or _holds(seen, record) or (seen is None and not move.under_way):
                continue
            found.append(Untold(machine_id, name, record.to_text(), seen))
    return found
