"""/metrics: Prometheus' text format from fleetd's API, over real etcd and behind the API's auth."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleetpy.api import create_app, serve
from fleetpy.conf import metrics
from fleetpy.engine.engine import Engine
from fleetpy.lab.etcd import start_cluster
from fleetpy.registry import Job, Machine, Registry
from fleetpy.registry.etcd3 import EtcdV3Store
from fleetpy.registry.measured import MeasuredStore
from fleetpy.systemd import DbusManager, SystemdError
from fleetpy.unit import UnitFile

pytestmark = pytest.mark.integration
pytest_plugins = ["fixtures_nodes"]

TOKEN = "s3cret"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_histogram_buckets_are_counted_once_each():
    histogram = metrics.Histogram("h", "help")
    for seconds in (0.0005, 0.003, 0.003, 20.0):
        histogram.observe(seconds)
    value = histogram.values[()]
    assert (value.count, value.buckets[0], value.buckets[2], sum(value.buckets)) == (4, 1, 2, 3)


async def test_metrics_over_tcp_need_the_token_and_count_units_etcd_and_scheduling(etcd_registry, tmp_path):
    # As fleetd opens it: every etcd request measured.
    registry = Registry(MeasuredStore(etcd_registry.store), etcd_registry.prefix)
    for mid in ("m1", "m2"):
        await registry.register_machine(Machine(mid), 60)
    digest = await registry.put_unit_file(UnitFile.parse("[Service]\nExecStart=/bin/true\n"))
    await registry.create_job(Job("a.service", digest, "launched"))
    await registry.create_job(Job("b.service", digest, "inactive"))
    await registry.create_job(Job("c.service", digest, "launched"))
    await registry.set_pending("c.service", "no machine fits")
    before = metrics.SCHEDULING_DECISIONS.values.get(("scheduled",), 0)
    await Engine(registry, "m1", lease_ttl=5).reconcile()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(registry, machine_id="m1")
    runner = await serve(
        app, socket_path=str(tmp_path / "fleet.sock"), listen=f"127.0.0.1:{port}", token=TOKEN
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            denied = await http.get("/metrics")
            assert denied.status_code == 401
            answer = await http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    finally:
        await runner.cleanup()
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/plain")
    found = samples(answer.text)
    assert found[("fleetpy_units", (("desired_state", "launched"),))] == 2
    assert found[("fleetpy_units", (("desired_state", "inactive"),))] == 1
    assert found[("fleetpy_machines", ())] == 2
    assert found[("fleetpy_scheduling_decisions_total", (("outcome", "scheduled"),))] >= before + 2
    assert found[("fleetpy_scheduling_pass_seconds_count", ())] >= 1
    # Each etcd request by the registry call it served: here the engine's pass.
    assert found[("fleetpy_etcd_request_seconds_count", (("call", "jobs"), ("operation", "list")))] >= 1
    assert (
        found[("fleetpy_etcd_request_seconds_count", (("call", "write_schedule"), ("operation", "apply")))]
        >= 1
    )
    bucket = (
        "fleetpy_etcd_request_seconds_bucket",
        (("call", "jobs"), ("le", "+Inf"), ("operation", "list")),
    )
    assert bucket in found


def test_fleetd_does_not_import_prometheus_client_until_scraped():
    probe = (
        "import sys, fleetpy.fleetd.main, fleetpy.api.metrics, fleetpy.conf.metrics;"
        "print('prometheus_client' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


async def test_dbus_calls_are_timed_by_method_and_refusals_counted(systemd_node):
    before = metrics.DBUS_SECONDS.values.get(("ListUnitsByNames",))
    before_count = before.count if before else 0
    refused_before = metrics.DBUS_ERRORS.values.get(("StartUnit",), 0)
    manager = await DbusManager.connect(
        systemd_node.env["DBUS_SESSION_BUS_ADDRESS"], systemd_node.dir / "units"
    )
    try:
        await manager.unit_state("nothing-here.service")
        with pytest.raises(SystemdError):
            await manager.start("nothing-here.service")  # systemd: no such unit file
    finally:
        await manager.close()
    assert metrics.DBUS_SECONDS.values[("ListUnitsByNames",)].count > before_count
    assert metrics.DBUS_ERRORS.values[("StartUnit",)] == refused_before + 1


async def test_metrics_answer_while_etcd_has_no_quorum_and_say_so(tmp_path):
    # A scrape when etcd is away is when an operator needs fleetd's own counters most.
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="fleetpy-etcd-3-") as base:
        members = start_cluster(Path(base), 3)
        registry = Registry(MeasuredStore(EtcdV3Store([m.client_url for m in members], retry_for=30)))
        app = create_app(registry, machine_id="m1")
        runner = await serve(app, socket_path=str(tmp_path / "fleet.sock"))
        transport = httpx.AsyncHTTPTransport(uds=str(tmp_path / "fleet.sock"))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://fleetd", timeout=30) as http:
                await registry.register_machine(Machine("m1"), 60)
                before = samples((await http.get("/metrics")).text)
                members[0].stop()
                members[1].stop()
                for _ in range(200):  # until the member left noticed that its leader is gone
                    if not members[2].healthy():
                        break
                    await asyncio.sleep(0.05)
                answer = await http.get("/metrics")
        finally:
            await runner.cleanup()
            await registry.close()
            for member in members:
                member.stop()
    assert before[("fleetpy_machines", ())] == 1
    assert before[("fleetpy_etcd_state", (("state", "ok"),))] == 1
    assert answer.status_code == 200, answer.text
    during = samples(answer.text)
    assert during[("fleetpy_etcd_state", (("state", "no_quorum"),))] == 1
    assert during[("fleetpy_etcd_state", (("state", "ok"),))] == 0
    assert ("fleetpy_machines", ()) not in during  # the registry cannot be read: no stale count
    assert any(name == "fleetpy_etcd_request_seconds_count" for name, _labels in during)  # its own
