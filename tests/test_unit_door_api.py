"""The API is the door: unit contents any later layer would read differently are refused there.

Regression tests for B1, B2 and B3 of the reliability issue and the line-end cases of the fleet
compatibility issue, through the real HTTP API over the in-memory registry.
"""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient, TestServer

from fleetpy.agent.agent import Agent
from fleetpy.api import create_app
from fleetpy.registry import Assignment, Machine, memory_registry
from fleetpy.systemd import FakeSystemd
from fleetpy.unit import load_unit

M1 = "113f16a7" + "0" * 24
SLEEP = {"section": "Service", "name": "ExecStart", "value": "/bin/sleep infinity"}


@pytest.fixture
async def registry():
    reg = memory_registry()
    await reg.register_machine(Machine(M1, "10.0.0.1"), ttl=60)
    return reg


@pytest.fixture
async def client(registry):
    async with TestClient(TestServer(create_app(registry, machine_id=M1))) as test_client:
        yield test_client


async def put(client, name: str, options: list[dict]):
    return await client.put(f"/fleet/v1/units/{name}", json={"desiredState": "launched", "options": options})


@pytest.mark.parametrize(
    ("option", "fragment"),
    [
        # B2: accepted before, then no longer parsed and GET /fleet/v1/units answered 400
        ({"section": "Service", "name": "ExecStart", "value": "/bin/true\r[oops"}, "U+000D"),
        *[
            ({"section": "Service", "name": "ExecStart", "value": f"/bin/true{ch}[oops"}, f"U+{ord(ch):04X}")
            for ch in "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
        ],
        *[
            ({"section": f"Ser{ch}vice", "name": "ExecStart", "value": "/bin/true"}, f"U+{ord(ch):04X}")
            for ch in "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
        ],
        *[
            ({"section": "Service", "name": f"Exec{ch}Start", "value": "/bin/true"}, f"U+{ord(ch):04X}")
            for ch in "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
        ],
        # B3: directives `fleetctl cat` did not show, which systemd ran
        (
            {
                "section": "Service",
                "name": "ExecStart",
                "value": "/bin/sleep infinity\rExecStartPre=/bin/touch /tmp/x",
            },
            "U+000D",
        ),
        ({"section": "Service", "name": "X\u0000ExecStartPre", "value": "/bin/touch /tmp/x"}, "U+0000"),
        (
            {"section": "Service", "name": "ExecStart", "value": "/bin/sleep 1\nExecStartPre=/bin/x"},
            "line break",
        ),
        # an option ending in a backslash swallows the next one, in fleet as in systemd
        ({"section": "Service", "name": "ExecStart", "value": "/bin/sleep 1 \\"}, "ends in a backslash"),
    ],
)
async def test_contents_that_would_change_meaning_are_refused_and_nothing_is_stored(
    client, registry, option, fragment
):
    before = await registry.index()
    resp = await put(
        client, "smuggle.service", [option, {"section": "Unit", "name": "Description", "value": "x"}]
    )
    body = await resp.json()
    assert resp.status == 400, body
    assert fragment in body["error"]["message"] and "option 0" in body["error"]["message"]
    assert await registry.index() == before
    listing = await client.get("/fleet/v1/units")
    assert listing.status == 200 and (await listing.json()).get("units", []) == []


async def test_listing_still_works_next_to_an_accepted_unit_with_a_continued_value(client, registry):
    # Go fleetctl sends a continued line as go-systemd read it: the backslash and newline kept.
    continued = {"section": "Service", "name": "ExecStart", "value": "/bin/sleep \\\n  infinity"}
    assert (await put(client, "ok.service", [continued])).status == 201
    listing = await (await client.get("/fleet/v1/units")).json()
    assert [u["options"] for u in listing["units"]] == [
        [{"section": "Service", "name": "ExecStart", "value": "/bin/sleep    infinity"}]
    ]
    text = await registry.store.get(registry.key("unit", (await registry.job("ok.service")).hash))
    assert text == "[Service]\nExecStart=/bin/sleep    infinity\n"


# B1: the API accepted "a..service" and the agent's second validator refused it, which killed
# every fleetd the unit was moved to. One validator now decides for every layer.
@pytest.mark.parametrize("name", ["a..service", "foo\\x2dbar.service", "a@b@c.service"])
async def test_a_name_the_api_accepts_runs_and_the_agent_survives(client, registry, name):
    resp = await client.put(
        f"/fleet/v1/units/{quote(name)}", json={"desiredState": "launched", "options": [SLEEP]}
    )
    assert resp.status == 201, await resp.text()
    systemd = FakeSystemd()
    agent = asyncio.create_task(Agent(registry, systemd, Machine(M1), ttl=5).run())
    try:
        await registry.assign(Assignment(name, M1, (await registry.job(name)).hash, "launched"))
        for _ in range(1500):
            if (await systemd.unit_state(name))[1] == "active" or agent.done():
                break
            await asyncio.sleep(0.002)
        assert not agent.done(), agent.exception() if agent.done() else None
        assert (await systemd.unit_state(name))[1] == "active"
    finally:
        agent.cancel()
    assert (await client.get(f"/fleet/v1/units/{quote(name)}")).status == 200


async def _submit_template(client, name: str, fleet_options: dict[str, str]):
    options = [SLEEP] + [{"section": "X-Fleet", "name": k, "value": v} for k, v in fleet_options.items()]
    return await client.put(f"/fleet/v1/units/{name}", json={"desiredState": "inactive", "options": options})


@pytest.mark.parametrize(
    ("fleet_options", "instance", "expected"),
    [
        (
            {"MachineMetadata": "hostname=%i"},
            "node1",
            {"machine_metadata": (("hostname", frozenset({"node1"})),)},
        ),
        ({"MachineID": "%i"}, M1, {"machine_id": M1}),
        ({"MachineOf": "%i.socket"}, "db", {"machine_of": ("db.socket",)}),
    ],
)
async def test_fleet_templates_with_instance_specifiers_are_accepted_and_read_per_instance(
    client, registry, fleet_options, instance, expected
):
    # fleet validated a template with its specifiers unexpanded; fleetpy used to expand %i to
    # nothing and refuse MachineMetadata=hostname=%i and MachineID=%i.
    resp = await _submit_template(client, "web@.service", fleet_options)
    assert resp.status == 201, await resp.text()
    name = f"web@{instance}.service"
    resp = await client.put(f"/fleet/v1/units/{name}", json={"desiredState": "launched"})
    assert resp.status == 201, await resp.text()
    fleet = load_unit(name, await registry.unit_file((await registry.job(name)).hash)).fleet
    assert {key: getattr(fleet, key) for key in expected} == expected


async def test_what_only_an_instance_can_show_wrong_is_refused_for_that_instance(client, registry):
    assert (await _submit_template(client, "web@.service", {"MachineOf": "%i"})).status == 201
    resp = await client.put("/fleet/v1/units/web@nosuffix.service", json={"desiredState": "launched"})
    body = await resp.json()
    assert resp.status == 400 and "MachineOf=nosuffix is not a unit name" in body["error"]["message"]
    resp = await client.put("/fleet/v1/units/web@db.service.service", json={"desiredState": "launched"})
    assert resp.status == 201, await resp.text()


async def test_global_fleet_read_as_false_is_refused_with_how_fleet_read_it(client, registry):
    options = [SLEEP, {"section": "X-Fleet", "name": "Global", "value": "y"}]
    resp = await put(client, "g.service", options)
    body = await resp.json()
    assert resp.status == 400 and "fleet read it as false" in body["error"]["message"]
    assert await registry.jobs() == []


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("MemoryRequest", "lots", "bad size 'lots'"),
        ("MemoryRequest", "0", "must be more than 0"),
        ("CPURequest", "two", "bad CPU amount 'two'"),
        ("MachineConstraint", "load1", "is not KEY OP VALUE"),
        ("MachineConstraint", "os>linux", "compares numbers"),
        ("MachineConstraint", "os==/(/", "bad regular expression"),
        ("MachineConstraint", "zone=={}", "a set is written {a,b,c}"),
        ("Strategy", "random", "use spread"),
    ],
)
async def test_bad_resource_options_are_refused_at_the_door_with_what_to_write(
    client, registry, name, value, fragment
):
    resp = await put(client, "r.service", [SLEEP, {"section": "X-Fleet", "name": name, "value": value}])
    body = await resp.json()
    assert resp.status == 400 and fragment in body["error"]["message"], body
    assert await registry.jobs() == []


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"HealthCheckMoveAfter": "often"}, "HealthCheckMoveAfter='often': give how many restarts"),
        (
            {"HealthCheckAction": "none", "HealthCheckMoveAfter": "2"},
            "counts the restarts of HealthCheckAction",
        ),
        ({"Global": "true", "HealthCheckMoveAfter": "2"}, "cannot be combined with HealthCheckMoveAfter"),
    ],
)
async def test_a_bad_health_move_is_refused_at_the_door_with_what_to_write(client, registry, extra, fragment):
    options = [SLEEP, {"section": "X-Fleet", "name": "HealthCheckTCP", "value": "127.0.0.1:80"}]
    options += [{"section": "X-Fleet", "name": key, "value": value} for key, value in extra.items()]
    resp = await put(client, "h.service", options)
    body = await resp.json()
    assert resp.status == 400 and fragment in body["error"]["message"], body
    assert await registry.jobs() == []
