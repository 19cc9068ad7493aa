"""`fleetpy lab metrics`: every node's /metrics in one Prometheus text, each sample labelled by node."""

from __future__ import annotations

from typing import Any

import httpx

from fleetpy.lab.lab import Lab


def scrape(lab: Lab, timeout: float = 5.0) -> str:
    """Scrape each running node's fleetd over its unix socket, as Prometheus would over TCP.

    A node that does not answer gets `fleetpy_scrape_up{node=...} 0` instead of its metrics.
    """
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Any] = {}
    up = GaugeMetricFamily("fleetpy_scrape_up", "1 if the node's fleetd answered the scrape", labels=["node"])
    for node in lab.state.nodes if lab.state else []:
        socket_path = lab.dir / node.name / "fleet.sock"
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), timeout=timeout) as http:
                answer = http.get("http://fleetd/metrics")
                answer.raise_for_status()
        except (httpx.HTTPError, OSError):
            up.add_metric([node.name], 0)
            continue
        up.add_metric([node.name], 1)
        for family in text_string_to_metric_families(answer.text):
            merged = families.setdefault(
                family.name, family.__class__(family.name, family.documentation, family.type)
            )
            for sample in family.samples:
                merged.add_sample(sample.name, {"node": node.name, **sample.labels}, sample.value)

    class Merged:
        def collect(self) -> list[Any]:
            return [up, *families.values()]

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry).decode()
