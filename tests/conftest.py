"""Shared fixtures: a real etcd for the whole session, a fresh key prefix per test."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import pytest

from fleetpy.lab.etcd import start_cluster
from fleetpy.registry import EtcdStore, Registry

# Fixtures that start real components. A test that uses one, even through another fixture,
# or that is parametrized over a real etcd (a parameter id "etcd"), is an integration test,
# so `pytest -m "not integration"` leaves it out.
REAL_COMPONENTS = {"etcd_url", "node_factory", "lab_bridge"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_real_etcd = callspec is not None and "etcd" in callspec.id.split("-")
        if on_real_etcd or REAL_COMPONENTS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def etcd_url():
    # tmpfs keeps etcd's fsyncs cheap; a missing etcd binary fails the tests, never skips them.
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="fleetpy-etcd-") as base:
        members = start_cluster(Path(base))
        try:
            yield members[0].client_url
        finally:
            for member in members:
                member.stop()


@pytest.fixture
def etcd_prefix():
    return f"/test-{uuid.uuid4().hex[:12]}/"


@pytest.fixture
def etcd_registry(etcd_url, etcd_prefix):
    return Registry(EtcdStore([etcd_url]), etcd_prefix)
