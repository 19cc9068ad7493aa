"""The HTTP API over the real etcd registry: the same contract as over the in-memory twin."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from fleetpy.api import create_app, serve
from fleetpy.client import Client, EtcdUnreachable
from fleetpy.lab.etcd import start_cluster
from fleetpy.registry import Assignment, Machine, Registry, UnitState
from fleetpy.registry.etcd2 import EtcdV2Store
from fleetpy.registry.etcd3 import EtcdV3Store
from fleetpy.unit import UnitFile

pytestmark = pytest.mark.integration

HELLO = [{"section": "Service", "name": "ExecStart", "value": "/bin/sleep 1000"}]
M1 = "113f16a7" + "0" * 24


@pytest.fixture
async def client(etcd_registry):
    await etcd_registry.register_machine(Machine(M1, "10.0.0.1", {"region": "us"}), ttl=60)
    app = create_app(etcd_registry, machine_id=M1)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def test_unit_lifecycle_on_etcd(client, etcd_registry):
    resp = await client.put(
        "/fleet/v1/units/hello.service", json={"desiredState": "launched", "options": HELLO}
    )
    assert resp.status == 201
    digest = (await etcd_registry.job("hello.service")).hash
    await etcd_registry.assign(Assignment("hello.service", M1, digest, "launched"))
    await etcd_registry.publish_state(UnitState("hello.service", M1, digest, "loaded", "active", "running"))
    unit = await (await client.get("/fleet/v1/units/hello.service")).json()
    assert (unit["currentState"], unit["machineID"]) == ("launched", M1)
    assert (await client.put("/fleet/v1/units/hello.service", json={"desiredState": "loaded"})).status == 204
    assert (await etcd_registry.job("hello.service")).desired_state == "loaded"
    states = (await (await client.get("/fleet/v1/state")).json())["states"]
    assert [(s["name"], s["systemdSubState"]) for s in states] == [("hello.service", "running")]
    assert (await client.delete("/fleet/v1/units/hello.service")).status == 204
    assert (await client.get("/fleet/v1/units/hello.service")).status == 404


async def test_other_content_replaces_the_unit_on_etcd(client, etcd_registry):
    # Go fleetctl --replace: new options for an existing unit replace it, as in fleet.
    await client.put("/fleet/v1/units/hello.service", json={"desiredState": "launched", "options": HELLO})
    other = [{"section": "Service", "name": "ExecStart", "value": "/bin/true"}]
    resp = await client.put("/fleet/v1/units/hello.service", json={"name": "hello.service", "options": other})
    assert resp.status == 201
    job = await etcd_registry.job("hello.service")
    assert (job.hash, job.desired_state) == (UnitFile.from_options(other).hash, "inactive")


async def test_patch_metadata_on_etcd(client, etcd_registry):
    ops = [{"op": "add", "path": f"/{M1}/metadata/disk", "value": "ssd"}]
    assert (await client.patch("/fleet/v1/machines", json=ops)).status == 204
    assert (await etcd_registry.machines())[0].metadata == {"region": "us", "disk": "ssd"}
    body = await (await client.get("/fleet/v1/machines")).json()
    assert body["machines"][0]["metadata"] == {"region": "us", "disk": "ssd"}


async def test_bad_name_writes_nothing_to_etcd(client, etcd_registry):
    resp = await client.put(
        "/fleet/v1/units/..%2Fx.service", json={"desiredState": "launched", "options": HELLO}
    )
    assert resp.status == 400
    assert await etcd_registry.jobs() == []


@pytest.fixture
def own_etcd(tmp_path_factory):
    """An etcd of this test's own, which the test may pause or stop."""
    base = tempfile.mkdtemp(dir="/dev/shm", prefix="fleetpy-etcd-api-")
    members = start_cluster(Path(base), enable_v2=True)
    try:
        yield members[0]
    finally:
        for member in members:
            if member.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(member.process.pid, signal.SIGCONT)
            member.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("store", [EtcdV2Store, EtcdV3Store])
@pytest.mark.parametrize("outage", ["paused", "stopped"])
async def test_etcd_outage_is_named_by_fleetd_within_the_clients_timeout(own_etcd, tmp_path, outage, store):
    # B12: fleetd's etcd retries (10 s) outlasted fleetctl's request timeout (10 s), so the
    # client said "cannot reach fleetd ... is fleetd running?" about a fleetd that was fine.
    registry = Registry(store([own_etcd.client_url]), "/b12/")
    await registry.register_machine(Machine(M1, "10.0.0.1"), ttl=60)
    sock = str(tmp_path / "fleet.sock")
    runner = await serve(create_app(registry, machine_id=M1), socket_path=sock)
    try:
        if outage == "paused":  # a hung or partitioned etcd: connections open, no answers
            os.kill(own_etcd.process.pid, signal.SIGSTOP)
        else:
            own_etcd.stop()
        # 10 s is fleetctl's default request timeout.
        with Client(f"unix://{sock}", timeout=10) as client, pytest.raises(EtcdUnreachable) as raised:
            await asyncio.to_thread(client.units)
        assert raised.value.code == 503
        assert raised.value.message.startswith("fleetd answered, but etcd ")
    finally:
        await runner.cleanup()
        await registry.close()
