"""The units/ library: every unit parses and states the scheduling it documents."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetpy.containers.discovery import Announcer, Etcd
from fleetpy.unit import FleetOptions, load_unit

UNITS = Path(__file__).resolve().parent.parent / "units"


@pytest.mark.parametrize("path", sorted(UNITS.glob("*.service")), ids=lambda p: p.name)
def test_unit_parses(path: Path) -> None:
    name = path.name.replace("@.", "@1.")
    unit = load_unit(name, path.read_text())
    assert unit.file.values("Service", "ExecStart")


def _fleet(name: str, instance: str | None = None) -> FleetOptions:
    return load_unit(instance or name, (UNITS / name).read_text()).fleet


def test_scheduling_options() -> None:
    assert _fleet("web@.service", "web@1.service").conflicts_with("web@2.service")
    assert _fleet("web@.service", "web@1.service").health.move_after == 2
    assert _fleet("web-discovery@.service", "web-discovery@7.service").machine_of == ("web@7.service",)
    assert _fleet("logger.service").is_global
    assert _fleet("db.service").metadata_matches({"role": "db"})
    assert not _fleet("db.service").metadata_matches({"role": "web"})
    batch = _fleet("batch@.service", "batch@1.service")
    assert (batch.memory_request, batch.cpu_request, batch.strategy) == (1024**3, 0.5, "binpack")
    facts = {"load1": 0.5, "kernel": "6.1.0-13-amd64", "zone": "a"}
    assert batch.failed_constraint(facts) is None
    assert str(batch.failed_constraint({**facts, "load1": 4.5})) == "load1<4"


def test_dependencies() -> None:
    es = load_unit("es.service", (UNITS / "es.service").read_text()).file
    assert es.values("Unit", "After") == ["docker.service"] and es.values("Unit", "Requires") == [
        "docker.service"
    ]
    sidekick = load_unit("web-discovery@7.service", (UNITS / "web-discovery@.service").read_text()).file
    assert sidekick.values("Unit", "BindsTo") == ["web@%i.service"]
    assert sidekick.values("Service", "EnvironmentFile") == ["-/etc/fleetpy/discovery.env"]


@pytest.mark.integration
def test_discovery_announces_a_key_on_a_lease_over_v3_and_removes_it(
    etcd_v3_url: str, etcd_prefix: str
) -> None:
    # etcd as it ships (v2 off): the sidekick needs only the v3 API.
    etcd = Etcd(etcd_v3_url)
    key = f"{etcd_prefix}services/web/web@1"
    announcer = Announcer(etcd, key, "10.251.0.11:8080", ttl=30)
    announcer.announce()
    announcer.announce()  # the same lease, kept alive
    ((value, ttl),) = etcd.list(f"{etcd_prefix}services/web/").values()
    assert value == "10.251.0.11:8080" and 0 < ttl <= 30
    etcd.delete(key)
    etcd.delete(key)  # already gone is fine
    assert etcd.list(f"{etcd_prefix}services/web/") == {}
