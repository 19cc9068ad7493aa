"""fleetd's metrics, kept as plain numbers; prometheus-client renders them only when scraped.

Recording is a dict update on fleetd's hot paths (etcd requests, D-Bus calls, scheduling passes,
reconciles). prometheus-client costs about 12 MB of RSS to import, so `fleetpy.api.metrics`
imports it on the first scrape of /metrics: a fleetd nobody scrapes never pays for it.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

# Seconds: from a fast etcd read (1 ms) to a slow systemd start or an etcd outage (10 s).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Counter:
    name: str
    help: str
    labels: tuple[str, ...] = ()
    values: dict[tuple[str, ...], float] = field(default_factory=dict)

    def inc(self, *label_values: str, amount: float = 1.0) -> None:
        self.values[label_values] = self.values.get(label_values, 0.0) + amount


@dataclass
class HistogramValue:
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))  # not cumulative
    count: int = 0
    sum: float = 0.0


@dataclass
class Histogram:
    name: str
    help: str
    labels: tuple[str, ...] = ()
    values: dict[tuple[str, ...], HistogramValue] = field(default_factory=dict)

    def observe(self, seconds: float, *label_values: str) -> None:
        value = self.values.get(label_values)
        if value is None:
            value = self.values[label_values] = HistogramValue()
        index = bisect.bisect_left(BUCKETS, seconds)
        if index < len(BUCKETS):
            value.buckets[index] += 1
        value.count += 1
        value.sum += seconds

    @contextmanager
    def time(self, *label_values: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.observe(time.perf_counter() - started, *label_values)


# The registry call (Registry's method, or what a batch writes) that the current etcd requests
# serve: set by the registry, read by the measured store, so etcd's time is told per fleetd
# activity. Its values are the registry's method names: a bounded set.
REGISTRY_CALL: ContextVar[str] = ContextVar("fleetpy_registry_call", default="")
OTHER_CALL = "other"  # a store used outside the registry


@contextmanager
def registry_call(name: str) -> Iterator[None]:
    token = REGISTRY_CALL.set(name)
    try:
        yield
    finally:
        REGISTRY_CALL.reset(token)


ETCD_SECONDS = Histogram(
    "fleetpy_etcd_request_seconds",
    "etcd requests by registry call and store operation",
    ("call", "operation"),
)
ETCD_ERRORS = Counter(
    "fleetpy_etcd_errors_total",
    "etcd requests that failed after retrying, by registry call and store operation",
    ("call", "operation"),
)
DBUS_SECONDS = Histogram("fleetpy_dbus_call_seconds", "D-Bus calls to systemd by method", ("method",))
DBUS_ERRORS = Counter("fleetpy_dbus_errors_total", "D-Bus calls to systemd that failed", ("method",))
SCHEDULING_SECONDS = Histogram("fleetpy_scheduling_pass_seconds", "the engine's scheduling passes")
SCHEDULING_DECISIONS = Counter(
    "fleetpy_scheduling_decisions_total", "units scheduled, moved or left pending", ("outcome",)
)
LEADER_CHANGES = Counter("fleetpy_leader_changes_total", "times this fleetd became the engine leader")
RECONCILE_SECONDS = Histogram("fleetpy_agent_reconcile_seconds", "the agent's passes over its schedule")
EVENTS_DROPPED = Counter("fleetpy_events_dropped_total", "events dropped while etcd stayed away too long")

ALL: tuple[Counter | Histogram, ...] = (
    ETCD_SECONDS,
    ETCD_ERRORS,
    DBUS_SECONDS,
    DBUS_ERRORS,
    SCHEDULING_SECONDS,
    SCHEDULING_DECISIONS,
    LEADER_CHANGES,
    RECONCILE_SECONDS,
    EVENTS_DROPPED,
)
