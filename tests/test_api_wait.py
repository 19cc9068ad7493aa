"""GET /fleetpy/v1/wait: blocking commands wait on a watch of the agents' states."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestClient, TestServer

from fleetpy.api import create_app
from fleetpy.registry import Assignment, Job, Machine, UnitState, memory_registry
from fleetpy.unit import UnitFile

M1 = "113f16a7" + "0" * 24
HELLO = UnitFile.parse("[Service]\nExecStart=/bin/sleep 1000\n")


@pytest.fixture
async def registry():
    reg = memory_registry()
    await reg.register_machine(Machine(M1, "10.0.0.1"), ttl=60)
    await reg.put_unit_file(HELLO)
    await reg.create_job(Job("hello.service", HELLO.hash, "launched"))
    await reg.assign(Assignment("hello.service", M1, HELLO.hash, "launched"))
    return reg


@pytest.fixture
async def client(registry):
    async with TestClient(TestServer(create_app(registry, machine_id=M1))) as test_client:
        yield test_client


async def wait(client, timeout: float, *units: str, state: str = "launched") -> dict:
    query = [("unit", u) for u in units] + [("state", state), ("timeout", str(timeout))]
    response = await client.get("/fleetpy/v1/wait", params=query)
    assert response.status == 200, await response.text()
    return await response.json()


async def test_wait_answers_when_the_agent_publishes_the_state(client, registry, monkeypatch) -> None:
    assert (await wait(client, 0, "hello.service"))["done"] is False
    watching = asyncio.Event()
    watch = registry.wait

    async def watch_and_tell(*args, **kwargs):
        watching.set()
        return await watch(*args, **kwargs)

    monkeypatch.setattr(registry, "wait", watch_and_tell)

    async def agent_reports() -> None:
        await watching.wait()  # the request is blocked on its watch: the state comes after
        await registry.publish_state(
            UnitState("hello.service", M1, HELLO.hash, "loaded", "active", "running")
        )

    reporting = asyncio.create_task(agent_reports())
    answer = await wait(client, 3, "hello.service")
    await reporting
    assert answer["done"] is True
    assert [(u["name"], u["currentState"], u["machineID"]) for u in answer["units"]] == [
        ("hello.service", "launched", M1)
    ]


async def test_wait_reports_failures_and_missing_units(client, registry) -> None:
    await registry.publish_state(
        UnitState("hello.service", M1, HELLO.hash, "loaded", "failed", "failed", reason="exit-code")
    )
    answer = await wait(client, 0, "hello.service", "nope.service")
    assert (answer["failed"], answer["missing"], answer["done"]) == (
        {"hello.service": "exit-code"},
        ["nope.service"],
        False,
    )
    answer = await wait(client, 0, "hello.service")
    assert answer["done"] is True


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ([("state", "launched")], "name the units"),
        ([("unit", "a b.service"), ("state", "launched")], "a b.service"),
        ([("unit", "hello.service"), ("state", "running")], "not a unit state"),
        ([("unit", "hello.service"), ("state", "launched"), ("timeout", "soon")], "seconds"),
    ],
)
async def test_wait_refuses_what_it_cannot_wait_for(client, query, says) -> None:
    response = await client.get("/fleetpy/v1/wait", params=query)
    assert response.status == 400
    assert says in (await response.json())["error"]["message"]
