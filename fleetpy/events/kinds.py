"""The kinds of event, with their type: Normal, or Warning for what an operator should look at."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fleetpy.conf.values import machine_id_prefix

if TYPE_CHECKING:
    from fleetpy.registry import VolumeMove

MACHINE_JOINED = "MachineJoined"
MACHINE_LEFT = "MachineLeft"
MACHINE_LOST = "MachineLost"
UNIT_SCHEDULED = "UnitScheduled"
UNIT_MOVED = "UnitMoved"
UNIT_PENDING = "UnitPending"
UNIT_STARTED = "UnitStarted"
UNIT_FAILED = "UnitFailed"
UNIT_HEALTHY = "UnitHealthy"
UNIT_UNHEALTHY = "UnitUnhealthy"
LEADER_CHANGED = "LeaderChanged"
ETCD_UNREACHABLE = "EtcdUnreachable"
ETCD_REACHABLE = "EtcdReachable"
VOLUME_MOVED = "VolumeMoved"
VOLUME_MOVE_FAILED = "VolumeMoveFailed"

WARNINGS = frozenset(
    {
        MACHINE_LOST,
        UNIT_MOVED,
        UNIT_PENDING,
        UNIT_FAILED,
        UNIT_UNHEALTHY,
        ETCD_UNREACHABLE,
        VOLUME_MOVE_FAILED,
    }
)
ALL = (
    MACHINE_JOINED,
    MACHINE_LEFT,
    MACHINE_LOST,
    UNIT_SCHEDULED,
    UNIT_MOVED,
    UNIT_PENDING,
    UNIT_STARTED,
    UNIT_FAILED,
    UNIT_HEALTHY,
    UNIT_UNHEALTHY,
    LEADER_CHANGED,
    ETCD_UNREACHABLE,
    ETCD_REACHABLE,
    VOLUME_MOVED,
    VOLUME_MOVE_FAILED,
)


def event_type(kind: str) -> str:
    return "Warning" if kind in WARNINGS else "Normal"


def volume_move_failed(name: str, move: VolumeMove, reason: str) -> str:
    """A VolumeMoveFailed event's message, whichever of the engine and the agents failed it."""
    return (
        f"moving volume {name} to {machine_id_prefix(move.target)} failed: {reason}; "
        f"it stays on {machine_id_prefix(move.source)}"
    )
