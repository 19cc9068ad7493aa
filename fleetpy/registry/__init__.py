"""The registry: cluster state (machines, jobs, schedule, unit states) kept in etcd.

The etcd stores live in `etcd2` and `etcd3`, imported only where used: each client library
costs a fleetd start-up time and memory, and a fleetd needs one.
"""

from fleetpy.registry.connect import ETCD_APIS, EtcdOptions, choose_api, open_store
from fleetpy.registry.memory import ManualClock, MemoryStore
from fleetpy.registry.models import (
    DESIRED_STATES,
    MOVE_COPYING,
    MOVE_DONE,
    MOVE_FAILED,
    MOVE_STOPPING,
    Assignment,
    Avoidance,
    Event,
    Health,
    Job,
    Machine,
    UnitState,
    VolumeMove,
    VolumeRecord,
)
from fleetpy.registry.registry import DEFAULT_PREFIX, Conflict, NotFound, Registry, memory_registry
from fleetpy.registry.store import Credentials, HistoryLost, NoQuorum, Store, StoreError, Unavailable

__all__ = [
    "ETCD_APIS",
    "DEFAULT_PREFIX",
    "DESIRED_STATES",
    "Assignment",
    "Avoidance",
    "Conflict",
    "Credentials",
    "EtcdOptions",
    "Event",
    "Health",
    "HistoryLost",
    "Job",
    "MOVE_COPYING",
    "MOVE_DONE",
    "MOVE_FAILED",
    "MOVE_STOPPING",
    "Machine",
    "ManualClock",
    "MemoryStore",
    "NoQuorum",
    "NotFound",
    "Registry",
    "Store",
    "StoreError",
    "Unavailable",
    "UnitState",
    "VolumeMove",
    "VolumeRecord",
    "choose_api",
    "memory_registry",
    "open_store",
]
