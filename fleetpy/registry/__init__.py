"""The registry: cluster state (machines, jobs, schedule, unit states) kept in etcd."""

from fleetpy.registry.models import DESIRED_STATES, Assignment, Job, Machine, UnitState
from fleetpy.registry.registry import DEFAULT_PREFIX, Conflict, NotFound, Registry, memory_registry
from fleetpy.registry.store import EtcdStore, HistoryLost, MemoryStore, StoreError, Unavailable

__all__ = [
    "DEFAULT_PREFIX",
    "DESIRED_STATES",
    "Assignment",
    "Conflict",
    "EtcdStore",
    "HistoryLost",
    "Job",
    "Machine",
    "MemoryStore",
    "NotFound",
    "Registry",
    "StoreError",
    "Unavailable",
    "UnitState",
    "memory_registry",
]
