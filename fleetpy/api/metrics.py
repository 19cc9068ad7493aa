"""GET /metrics: Prometheus' text format, behind the API's auth like every other route."""

from __future__ import annotations

import collections
from typing import Any

from aiohttp import web

from fleetpy.conf import metrics
from fleetpy.registry import Registry


def _families(units: dict[str, dict[tuple[str, ...], float]]) -> list[Any]:
    """This process's metrics as prometheus-client metric families (imported here, when scraped)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    families: list[Any] = []
    for name, (help_text, labels) in UNIT_GAUGES.items():
        gauge = GaugeMetricFamily(name, help_text, labels=list(labels))
        for label_values, value in sorted(units[name].items()):
            gauge.add_metric(list(label_values), value)
        families.append(gauge)
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

        jobs, states, pending, machines = (
            await self.registry.jobs(),
            await self.registry.states(),
            await self.registry.pending(),
            await self.registry.machines(),
        )
        units: dict[str, dict[tuple[str, ...], float]] = {
            "fleetpy_units": dict(collections.Counter((j.desired_state,) for j in jobs)),
            "fleetpy_unit_states": dict(collections.Counter((s.active_state,) for s in states)),
            "fleetpy_units_pending": {(): float(len(pending))},
            "fleetpy_machines": {(): float(len(machines))},
        }
        families = _families(units)

        class Snapshot:
            def collect(self) -> list[Any]:
                return families

        registry = CollectorRegistry(auto_describe=False)
        registry.register(Snapshot())
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
