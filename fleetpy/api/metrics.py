"""GET /metrics: Prometheus' text format, behind the API's auth like every other route.

It answers while etcd is away too, when this fleetd's own counters matter most: the cluster-wide
gauges read from the registry are left out then, and `fleetpy_etcd_state` says why."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from aiohttp import web

from fleetpy.conf import metrics
from fleetpy.registry import NoQuorum, Registry, StoreError, Unavailable

# How long a scrape waits for the registry's counts before it answers without them: well under
# the API's deadline for a request, and under Prometheus' default scrape timeout (10 s).
REGISTRY_WAIT = 2.0
# fleetpy_etcd_state's states: exactly one of them is 1.
ETCD_STATES = ("ok", "unreachable", "no_quorum")


def etcd_state(outage: Unavailable | None, registry_read: bool) -> str:
    """How etcd was when scraped: the store's account of its latest failure, if any."""
    if isinstance(outage, NoQuorum):
        return "no_quorum"
    return "unreachable" if outage is not None or not registry_read else "ok"


def _families(units: dict[str, dict[tuple[str, ...], float]] | None, etcd: str) -> list[Any]:
    """This process's metrics as prometheus-client metric families (imported here, when scraped);
    `units` None when the registry could not be read."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    families: list[Any] = []
    for name, (help_text, labels) in UNIT_GAUGES.items() if units is not None else ():
        gauge = GaugeMetricFamily(name, help_text, labels=list(labels))
        for label_values, value in sorted(units[name].items()):
            gauge.add_metric(list(label_values), value)
        families.append(gauge)
    state = GaugeMetricFamily(
        "fleetpy_etcd_state",
        "etcd as this fleetd finds it: ok, unreachable, or no_quorum (its members answer without a "
        "leader; scheduling waits, running units keep running); 1 for the current state",
        labels=["state"],
    )
    for name in ETCD_STATES:
        state.add_metric([name], 1.0 if name == etcd else 0.0)
    families.append(state)
    for metric in metrics.ALL:
        labels = list(metric.labels)
        if isinstance(metric, metrics.Counter):
            family = CounterMetricFamily(metric.name.removesuffix("_total"), metric.help, labels=labels)
            for label_values, value in sorted(metric.values.items()):
                family.add_metric(list(label_values), value)
        else:
            family = HistogramMetricFamily(metric.name, metric.help, labels=labels)
            for label_values, value in sorted(metric.values.items()):
                cumulative, buckets = 0, []
                for bound, count in zip(metrics.BUCKETS, value.buckets, strict=True):
                    cumulative += count
                    buckets.append((repr(bound), cumulative))
                buckets.append(("+Inf", value.count))
                family.add_metric(list(label_values), buckets, value.sum)
        families.append(family)
    return families


UNIT_GAUGES = {
    "fleetpy_units": ("units by the state their user wants (desiredState)", ("desired_state",)),
    "fleetpy_unit_states": (
        "units by systemd's active state, as published by their machines",
        ("active_state",),
    ),
    "fleetpy_units_pending": ("units that fit no machine", ()),
    "fleetpy_machines": ("machines alive in the registry", ()),
}


class MetricsRoute:
    def __init__(self, registry: Registry):
        self.registry = registry

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/metrics", self.metrics)

    async def metrics(self, _request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        units = await self._unit_counts()
        families = _families(units, etcd_state(self.registry.outage(), units is not None))

        class Snapshot:
            def collect(self) -> list[Any]:
                return families

        registry = CollectorRegistry(auto_describe=False)
        registry.register(Snapshot())
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _unit_counts(self) -> dict[str, dict[tuple[str, ...], float]] | None:
        """The cluster-wide gauges from the registry; None when etcd does not answer in time."""
        try:
            async with asyncio.timeout(REGISTRY_WAIT):
                jobs, states, pending, machines = (
                    await self.registry.jobs(),
                    await self.registry.states(),
                    await self.registry.pending(),
                    await self.registry.machines(),
                )
        except (StoreError, TimeoutError):
            return None
        return {
            "fleetpy_units": dict(collections.Counter((j.desired_state,) for j in jobs)),
            "fleetpy_unit_states": dict(collections.Counter((s.active_state,) for s in states)),
            "fleetpy_units_pending": {(): float(len(pending))},
            "fleetpy_machines": {(): float(len(machines))},
        }
