"""The API's watch-fed read cache: GETs are served from the copy, not etcd, and a client's own
PUT is in what its next GET lists."""

from __future__ import annotations

import asyncio

from aiohttp.test_utils import TestClient, TestServer

from fleetpy.api import create_app
from fleetpy.registry import Machine, Registry, memory_registry
from tests.test_registry_mirror import CountingStore

HELLO = [{"section": "Service", "name": "ExecStart", "value": "/bin/sleep 1000"}]
M1 = "113f16a7" + "0" * 24


async def test_a_storm_of_gets_reads_the_registry_once_and_sees_each_put_at_once():
    base = memory_registry()
    await base.register_machine(Machine(M1, "10.0.0.1"), ttl=60)
    store = CountingStore(base.store)
    app = create_app(Registry(store, base.prefix), machine_id=M1, cached=True)
    async with TestClient(TestServer(app)) as client:
        for i in range(10):
            name = f"web{i}.service"
            put = await client.put(
                f"/fleet/v1/units/{name}", json={"desiredState": "launched", "options": HELLO}
            )
            assert put.status == 201
            # Read-your-writes: the unit is listed by the very next request.
            listed = await (await client.get("/fleet/v1/units")).json()
            assert name in [u["name"] for u in listed["units"]]
        gets = await asyncio.gather(
            *(client.get(path) for path in ["/fleet/v1/units", "/fleet/v1/state", "/fleet/v1/machines"] * 30)
        )
        assert all(r.status == 200 for r in gets)
        machines = await (await client.get("/fleet/v1/machines")).json()
        assert [m["id"] for m in machines["machines"]] == [M1]
    # Until the copy had listed the registry, reads went to it; after that, none did.
    assert store.calls["list"] <= 5, store.calls
    assert store.calls["get"] <= 5, store.calls


async def test_a_write_made_elsewhere_shows_once_the_watch_delivers_it():
    base = memory_registry()
    app = create_app(base, machine_id=M1, cached=True)
    async with TestClient(TestServer(app)) as client:
        assert (await (await client.get("/fleet/v1/machines")).json())["machines"] == []
        await base.register_machine(Machine(M1, "10.0.0.1"), ttl=60)
        for _ in range(1500):
            found = (await (await client.get("/fleet/v1/machines")).json())["machines"]
            if found:
                break
            await asyncio.sleep(0.002)
        assert [m["id"] for m in found] == [M1]
