"""The HTTP API over the in-memory registry: routes, status codes, error shape, paging."""

from __future__ import annotations

import io
import os
import socket
import stat
from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp.test_utils import TestClient, TestServer

from fleetpy.api import SystemctlUnitInfo, create_app, serve
from fleetpy.api.fleet_v1 import PAGE_SIZE
from fleetpy.api.views import machine_state
from fleetpy.registry import Assignment, Job, Machine, Unavailable, UnitState, memory_registry
from fleetpy.unit import UnitFile

HELLO = [{"section": "Service", "name": "ExecStart", "value": "/bin/sleep 1000"}]
OTHER = [{"section": "Service", "name": "ExecStart", "value": "/bin/sleep 2000"}]
GLOBAL = HELLO + [{"section": "X-Fleet", "name": "Global", "value": "true"}]
M1 = "113f16a7" + "0" * 24
M2 = "2c9a1b3e" + "0" * 24


class FakeLocal:
    """LocalUnitInfo that answers from memory and records what was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple] = []

    async def status(self, name: str) -> str:
        self.asked.append(("status", name))
        return f"* {name} - running\n"

    async def journal(self, name: str, lines: int, follow: bool) -> AsyncIterator[str]:
        self.asked.append(("journal", name, lines, follow))
        for i in range(lines):
            yield f"line {i}\n"


@pytest.fixture
async def registry():
    reg = memory_registry()
    await reg.register_machine(Machine(M1, "10.0.0.1", {"region": "us", "disk": "ssd"}), ttl=60)
    await reg.register_machine(Machine(M2, "10.0.0.2"), ttl=60)
    return reg


@pytest.fixture
def local():
    return FakeLocal()


@pytest.fixture
async def client(registry, local):
    app = create_app(registry, machine_id=M1, local=local)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def error_of(response) -> tuple[int, str]:
    body = await response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == response.status
    return response.status, body["error"]["message"]


async def test_create_then_get_unit(client, registry):
    resp = await client.put(
        "/fleet/v1/units/hello.service", json={"desiredState": "launched", "options": HELLO}
    )
    assert resp.status == 201
    resp = await client.get("/fleet/v1/units/hello.service")
    assert resp.status == 200
    assert await resp.json() == {
        "name": "hello.service",
        "options": HELLO,
        "desiredState": "launched",
        "currentState": "inactive",
        "global": False,
    }
    assert (await registry.job("hello.service")).desired_state == "launched"


async def test_current_state_follows_the_agent(client, registry):
    await client.put("/fleet/v1/units/hello.service", json={"desiredState": "launched", "options": HELLO})
    digest = (await registry.job("hello.service")).hash
    await registry.assign(Assignment("hello.service", M2, digest, "launched"))
    unit = await (await client.get("/fleet/v1/units/hello.service")).json()
    assert (unit["currentState"], unit["machineID"]) == ("inactive", M2)
    await registry.publish_state(UnitState("hello.service", M2, digest, "loaded", "inactive", "dead"))
    assert (await (await client.get("/fleet/v1/units/hello.service")).json())["currentState"] == "loaded"
    await registry.publish_state(UnitState("hello.service", M2, digest, "loaded", "active", "running"))
    assert (await (await client.get("/fleet/v1/units/hello.service")).json())["currentState"] == "launched"


async def test_global_unit_has_no_machine_id(client, registry):
    await client.put("/fleet/v1/units/g.service", json={"desiredState": "launched", "options": GLOBAL})
    digest = (await registry.job("g.service")).hash
    for machine in (M1, M2):
        await registry.assign(Assignment("g.service", machine, digest, "launched"))
    await registry.publish_state(UnitState("g.service", M1, digest, "loaded", "active", "running"))
    unit = await (await client.get("/fleet/v1/units/g.service")).json()
    assert "machineID" not in unit
    assert unit["global"] is True
    assert unit["currentState"] == "inactive"  # M2 has not reported yet


async def test_put_existing_unit_changes_desired_state(client, registry):
    await client.put("/fleet/v1/units/hello.service", json={"desiredState": "inactive", "options": HELLO})
    resp = await client.put("/fleet/v1/units/hello.service", json={"desiredState": "loaded"})
    assert resp.status == 204
    resp = await client.put(
        "/fleet/v1/units/hello.service", json={"desiredState": "launched", "options": HELLO}
    )
    assert resp.status == 204
    assert (await registry.job("hello.service")).desired_state == "launched"


async def test_put_existing_unit_with_other_content_replaces_it(client, registry):
    # Go fleetctl `start --replace` (and submit/load --replace) sends the new options for an
    # existing unit, without a desiredState; fleet replaces the unit and makes it inactive.
    await client.put("/fleet/v1/units/hello.service", json={"desiredState": "launched", "options": HELLO})
    resp = await client.put("/fleet/v1/units/hello.service", json={"name": "hello.service", "options": OTHER})
    assert resp.status == 201
    job = await registry.job("hello.service")
    assert (job.hash, job.desired_state) == (UnitFile.from_options(OTHER).hash, "inactive")
    unit = await (await client.get("/fleet/v1/units/hello.service")).json()
    assert unit["options"] == OTHER


async def test_create_without_options_conflicts(client):
    resp = await client.put("/fleet/v1/units/hello.service", json={"desiredState": "launched"})
    assert (await error_of(resp))[0] == 409
    resp = await client.put("/fleet/v1/units/hello.service", json={"desiredState": "launched", "options": []})
    assert (await error_of(resp))[0] == 409


@pytest.mark.parametrize(
    "body",
    [
        {"desiredState": "running", "options": HELLO},
        {"desiredState": "launched", "options": "ExecStart=/bin/true"},
        {"desiredState": "launched", "options": [{"section": "Service"}]},
        {"desiredState": "launched", "name": "other.service", "options": HELLO},
        ["not", "an", "object"],
    ],
)
async def test_invalid_unit_bodies_are_bad_requests(client, registry, body):
    resp = await client.put("/fleet/v1/units/hello.service", json=body)
    assert (await error_of(resp))[0] == 400
    assert await registry.jobs() == []


async def test_go_fleetctl_submit_sends_no_desired_state(client, registry):
    # Go fleetctl submit/load/start first create the unit with {"name", "options"} only
    # (Go omits the empty desiredState): fleet creates it inactive and answers 201.
    resp = await client.put(
        "/fleet/v1/units/hello.service?alt=json", json={"name": "hello.service", "options": HELLO}
    )
    assert resp.status == 201
    assert (await registry.job("hello.service")).desired_state == "inactive"
    # Then it sets the target with {"desiredState", "name"} and no options: 204.
    resp = await client.put(
        "/fleet/v1/units/hello.service?alt=json", json={"desiredState": "launched", "name": "hello.service"}
    )
    assert resp.status == 204
    assert (await registry.job("hello.service")).desired_state == "launched"


async def test_go_fleetctl_template_is_submitted_without_desired_state(client, registry):
    # Go fleetctl `submit web@.service` and `start web@1.service` (which submits the template
    # from disk first) send the template with options only.
    resp = await client.put("/fleet/v1/units/web@.service", json={"name": "web@.service", "options": HELLO})
    assert resp.status == 201
    assert (await registry.job("web@.service")).desired_state == "inactive"


async def test_put_existing_unit_without_desired_state_conflicts(client, registry):
    # As fleet: nothing to create and nothing to set is a conflict, not a silent success.
    await client.put("/fleet/v1/units/hello.service", json={"desiredState": "loaded", "options": HELLO})
    for body in ({"name": "hello.service"}, {"name": "hello.service", "options": HELLO}):
        resp = await client.put("/fleet/v1/units/hello.service", json=body)
        assert await error_of(resp) == (
            409,
            "unit hello.service already exists; updating it needs a desiredState",
        )
    assert (await registry.job("hello.service")).desired_state == "loaded"


async def test_invalid_fleet_options_are_bad_requests(client, registry):
    options = HELLO + [{"section": "X-Fleet", "name": "Bogus", "value": "1"}]
    resp = await client.put(
        "/fleet/v1/units/hello.service", json={"desiredState": "launched", "options": options}
    )
    status, message = await error_of(resp)
    assert status == 400 and "Bogus" in message
    assert await registry.jobs() == []


async def test_bad_json_is_a_bad_request(client):
    resp = await client.put(
        "/fleet/v1/units/hello.service", data=b"{nope", headers={"Content-Type": "application/json"}
    )
    status, message = await error_of(resp)
    assert status == 400 and "not valid JSON" in message


async def test_oversized_body_is_refused(client, registry):
    resp = await client.put("/fleet/v1/units/hello.service", data=io.BytesIO(b" " * ((1 << 20) + 1)))
    assert (await error_of(resp))[0] == 413
    assert await registry.jobs() == []


@pytest.mark.parametrize("name", ["..%2Fx.service", "hello", "a%20b.service", "x.exe", "..", "%2E%2E"])
async def test_bad_unit_names_are_refused_and_nothing_written(client, registry, name):
    before = await registry.index()
    resp = await client.put(f"/fleet/v1/units/{name}", json={"desiredState": "launched", "options": HELLO})
    assert resp.status in (400, 404)
    await error_of(resp)
    assert await registry.index() == before
    for path in (f"/fleet/v1/units/{name}", f"/fleetpy/v1/units/{name}/status"):
        assert (await client.get(path)).status in (400, 404)


async def test_dot_dot_name_is_invalid(client):
    resp = await client.get("/fleet/v1/units/..%2Fx.service")
    status, message = await error_of(resp)
    assert status == 400 and "letters, digits" in message


async def test_template_instance_without_options_uses_template(client, registry):
    await client.put("/fleet/v1/units/web@.service", json={"desiredState": "inactive", "options": HELLO})
    resp = await client.put("/fleet/v1/units/web@1.service", json={"desiredState": "launched"})
    assert resp.status == 201
    assert (await registry.job("web@1.service")).hash == (await registry.job("web@.service")).hash


async def test_template_cannot_be_started(client):
    resp = await client.put(
        "/fleet/v1/units/web@.service", json={"desiredState": "launched", "options": HELLO}
    )
    status, message = await error_of(resp)
    assert status == 400 and "template" in message


async def test_delete_unit(client, registry):
    await client.put("/fleet/v1/units/hello.service", json={"desiredState": "inactive", "options": HELLO})
    digest = (await registry.job("hello.service")).hash
    assert (await client.delete("/fleet/v1/units/hello.service")).status == 204
    assert await registry.job("hello.service") is None
    assert await registry.unit_file(digest) is not None
    resp = await client.delete("/fleet/v1/units/hello.service")
    assert (await error_of(resp))[0] == 404


async def test_missing_unit_is_not_found(client):
    status, message = await error_of(await client.get("/fleet/v1/units/nope.service"))
    assert (status, message) == (404, "unit nope.service not found")


async def test_unknown_path_and_method(client):
    assert (await error_of(await client.get("/fleet/v1/nothing")))[0] == 404
    assert (await error_of(await client.post("/fleet/v1/units/hello.service", json={})))[0] == 405


async def test_units_are_paged(client, registry):
    for i in range(PAGE_SIZE + 5):
        resp = await client.put(
            f"/fleet/v1/units/u{i:03}.service", json={"desiredState": "inactive", "options": HELLO}
        )
        assert resp.status == 201
    first = await (await client.get("/fleet/v1/units")).json()
    assert len(first["units"]) == PAGE_SIZE
    second = await (
        await client.get("/fleet/v1/units", params={"nextPageToken": first["nextPageToken"]})
    ).json()
    assert "nextPageToken" not in second
    names = [u["name"] for u in first["units"] + second["units"]]
    assert names == [f"u{i:03}.service" for i in range(PAGE_SIZE + 5)]
    resp = await client.get("/fleet/v1/units", params={"nextPageToken": "garbage!"})
    assert await error_of(resp) == (400, "invalid value of nextPageToken query parameter")


async def test_state_lists_only_live_machines_and_filters(client, registry):
    await registry.publish_state(UnitState("a.service", M1, "h", "loaded", "active", "running"))
    await registry.publish_state(UnitState("b.service", M2, "h", "loaded", "inactive", "dead"))
    await registry.publish_state(UnitState("c.service", "gone", "h", "loaded", "active", "running"))
    states = (await (await client.get("/fleet/v1/state")).json())["states"]
    assert [s["name"] for s in states] == ["a.service", "b.service"]
    assert states[0] == {
        "name": "a.service",
        "hash": "h",
        "machineID": M1,
        "systemdLoadState": "loaded",
        "systemdActiveState": "active",
        "systemdSubState": "running",
    }
    by_machine = await (await client.get("/fleet/v1/state", params={"machineID": M2})).json()
    assert [s["name"] for s in by_machine["states"]] == ["b.service"]
    by_unit = await (await client.get("/fleet/v1/state", params={"unitName": "a.service"})).json()
    assert [s["name"] for s in by_unit["states"]] == ["a.service"]


async def test_get_state_of_one_unit(client, registry):
    # Go fleetctl start polls GET /fleet/v1/state/NAME until systemdActiveState is "active" and
    # systemdLoadState "loaded"; it dereferences the answer, so the route must exist.
    await registry.publish_state(UnitState("a.service", M2, "h", "loaded", "active", "running"))
    await registry.publish_state(UnitState("a.service", "gone", "h", "loaded", "failed", "failed"))
    resp = await client.get("/fleet/v1/state/a.service?alt=json")
    assert resp.status == 200
    assert await resp.json() == {
        "name": "a.service",
        "hash": "h",
        "machineID": M2,
        "systemdLoadState": "loaded",
        "systemdActiveState": "active",
        "systemdSubState": "running",
    }
    resp = await client.get("/fleet/v1/state/b.service")
    assert await error_of(resp) == (404, "unit b.service has no state on any live machine")


async def test_list_machines(client):
    body = await (await client.get("/fleet/v1/machines")).json()
    assert body == {
        "machines": [
            {"id": M1, "primaryIP": "10.0.0.1", "metadata": {"region": "us", "disk": "ssd"}},
            {"id": M2, "primaryIP": "10.0.0.2", "metadata": {}},
        ]
    }


async def test_patch_machine_metadata(client, registry):
    ops = [
        {"op": "add", "path": f"/{M2}/metadata/role", "value": "db"},
        {"op": "replace", "path": f"/{M1}/metadata/region", "value": "eu"},
        {"op": "remove", "path": f"/{M1}/metadata/disk"},
    ]
    assert (await client.patch("/fleet/v1/machines", json=ops)).status == 204
    machines = {m.id: m.metadata for m in await registry.machines()}
    assert machines == {M1: {"region": "eu"}, M2: {"role": "db"}}


async def test_patch_accepts_the_value_shape_fleets_server_reads(client, registry):
    ops = [{"op": "add", "path": f"/{M2}/metadata/role", "value": {"value": "db"}}]
    assert (await client.patch("/fleet/v1/machines", json=ops)).status == 204
    assert {m.id: m.metadata for m in await registry.machines()}[M2] == {"role": "db"}


@pytest.mark.parametrize(
    "ops",
    [
        [{"op": "move", "path": f"/{M1}/metadata/a", "value": "x"}],
        [{"op": "add", "path": f"/{M1}/region", "value": "x"}],
        [{"op": "add", "path": f"/{M1}/metadata/a"}],
        {"op": "add"},
    ],
)
async def test_bad_patches_are_bad_requests(client, registry, ops):
    assert (await error_of(await client.patch("/fleet/v1/machines", json=ops)))[0] == 400
    assert (await registry.machines())[0].metadata == {"region": "us", "disk": "ssd"}


async def test_patch_unknown_machine_is_not_found(client):
    ops = [{"op": "add", "path": "/nobody/metadata/a", "value": "x"}]
    assert (await error_of(await client.patch("/fleet/v1/machines", json=ops)))[0] == 404


async def test_discovery(client):
    body = await (await client.get("/fleet/v1/discovery")).json()
    assert body["name"] == "fleet"


async def test_pending_reason(client, registry):
    await client.put("/fleet/v1/units/hello.service", json={"desiredState": "launched", "options": HELLO})
    body = await (await client.get("/fleetpy/v1/units/hello.service/pending")).json()
    assert body == {"name": "hello.service", "reason": None}
    await registry.set_pending("hello.service", "no machine has region=mars")
    body = await (await client.get("/fleetpy/v1/units/hello.service/pending")).json()
    assert body["reason"] == "no machine has region=mars"
    assert (await client.get("/fleetpy/v1/units/nope.service/pending")).status == 404


async def test_status_and_journal_of_a_local_unit(client, registry, local):
    await client.put("/fleet/v1/units/hello.service", json={"desiredState": "launched", "options": HELLO})
    await registry.assign(
        Assignment("hello.service", M1, (await registry.job("hello.service")).hash, "launched")
    )
    body = await (await client.get("/fleetpy/v1/units/hello.service/status")).json()
    assert body["status"] == "* hello.service - running\n"
    resp = await client.get(
        "/fleetpy/v1/units/hello.service/journal", params={"lines": "3", "follow": "true"}
    )
    assert await resp.text() == "line 0\nline 1\nline 2\n"
    assert local.asked == [("status", "hello.service"), ("journal", "hello.service", 3, True)]


async def test_status_of_unscheduled_unit_says_why(client, registry):
    await client.put("/fleet/v1/units/hello.service", json={"desiredState": "launched", "options": HELLO})
    await registry.set_pending("hello.service", "no machine matches")
    status, message = await error_of(await client.get("/fleetpy/v1/units/hello.service/status"))
    assert status == 404 and "not scheduled on any machine: no machine matches" in message


async def test_status_of_remote_unit_without_endpoint_explains(client, registry):
    await client.put("/fleet/v1/units/hello.service", json={"desiredState": "launched", "options": HELLO})
    await registry.assign(
        Assignment("hello.service", M2, (await registry.job("hello.service")).hash, "launched")
    )
    status, message = await error_of(await client.get("/fleetpy/v1/units/hello.service/status"))
    assert status == 502
    assert message == "machine 2c9a1b3e... has no API endpoint; start its fleetd with --api-listen"


async def test_status_and_journal_are_forwarded_to_the_running_machine(registry, tmp_path):
    """Two fleetds: the one asked forwards to the peer's TCP endpoint with the peer token."""
    peer_local = FakeLocal()
    peer_app = create_app(registry, machine_id=M2, local=peer_local)
    port = _free_port()
    runner = await serve(
        peer_app, socket_path=str(tmp_path / "peer.sock"), listen=f"127.0.0.1:{port}", token="peer-secret"
    )
    try:
        await registry.register_machine(
            Machine(M2, "10.0.0.2", api_endpoint=f"http://127.0.0.1:{port}"), ttl=60
        )
        digest = await registry.put_unit_file(UnitFile.from_options(HELLO))
        await registry.create_job(Job("hello.service", digest, "launched"))
        await registry.assign(
            Assignment("hello.service", M2, (await registry.job("hello.service")).hash, "launched")
        )
        app = create_app(registry, machine_id=M1, local=FakeLocal(), peer_token="peer-secret")
        async with TestClient(TestServer(app)) as client:
            body = await (await client.get("/fleetpy/v1/units/hello.service/status")).json()
            assert body["machineID"] == M2
            resp = await client.get("/fleetpy/v1/units/hello.service/journal", params={"lines": "2"})
            assert await resp.text() == "line 0\nline 1\n"
        assert peer_local.asked == [("status", "hello.service"), ("journal", "hello.service", 2, False)]
    finally:
        await runner.cleanup()


async def test_registry_unavailable_is_503(registry):
    class Down:
        def __getattr__(self, name):
            async def fail(*args, **kwargs):
                raise Unavailable("etcd is unreachable at http://x; check that etcd runs")

            return fail

    async with TestClient(TestServer(create_app(Down(), machine_id=M1))) as client:
        assert await error_of(await client.get("/fleet/v1/units")) == (
            503,
            "etcd is unreachable at http://x; check that etcd runs",
        )


async def test_unexpected_errors_do_not_leak(registry):
    class Broken:
        def __getattr__(self, name):
            async def fail(*args, **kwargs):
                raise RuntimeError("secret internals")

            return fail

    async with TestClient(TestServer(create_app(Broken(), machine_id=M1))) as client:
        status, message = await error_of(await client.get("/fleet/v1/machines"))
        assert status == 500 and "secret" not in message


async def test_unix_socket_mode_and_no_token_needed(registry, tmp_path, default_tls):
    path = tmp_path / "run" / "fleet.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on, as a crashed fleetd leaves
    runner = await serve(
        create_app(registry, machine_id=M1),
        socket_path=str(path),
        listen=f"127.0.0.1:{_free_port()}",
        token="t0ken",
    )
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        transport = httpx.AsyncHTTPTransport(uds=str(path), verify=default_tls)
        async with httpx.AsyncClient(transport=transport) as http:
            assert (await http.get("http://fleetd/fleet/v1/machines")).status_code == 200
    finally:
        await runner.cleanup()


async def test_socket_parent_directory_is_created(registry, tmp_path):
    path = tmp_path / "new" / "fleet.sock"
    runner = await serve(create_app(registry, machine_id=M1), socket_path=str(path))
    try:
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o755
    finally:
        await runner.cleanup()


async def test_tcp_without_token_or_tls_is_refused(registry, tmp_path):
    with pytest.raises(ValueError, match="without authentication"):
        await serve(
            create_app(registry, machine_id=M1),
            socket_path=str(tmp_path / "fleet.sock"),
            listen="127.0.0.1:0",
        )


async def test_tcp_needs_the_bearer_token(registry, tmp_path, default_tls):
    port = _free_port()
    runner = await serve(
        create_app(registry, machine_id=M1),
        socket_path=str(tmp_path / "fleet.sock"),
        listen=f"127.0.0.1:{port}",
        token="t0ken",
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", verify=default_tls) as http:
            resp = await http.get("/fleet/v1/machines")
            assert resp.status_code == 401 and resp.json()["error"]["code"] == 401
            resp = await http.get("/fleet/v1/machines", headers={"Authorization": "Bearer wrong"})
            assert resp.status_code == 401
            resp = await http.get("/fleet/v1/machines", headers={"Authorization": "Bearer t0ken"})
            assert resp.status_code == 200
    finally:
        await runner.cleanup()


def test_systemctl_commands_are_argument_lists():
    user = SystemctlUnitInfo("user", {"XDG_RUNTIME_DIR": "/run/user/1000"})
    assert user.status_argv("a.service") == ["systemctl", "--user", "status", "--no-pager", "--", "a.service"]
    assert user.journal_argv("a.service", 5, True) == [
        "journalctl",
        "--user-unit=a.service",
        "-n",
        "5",
        "--no-pager",
        "-f",
    ]
    system = SystemctlUnitInfo("system", {})
    assert system.journal_argv("a.service", 10, False) == [
        "journalctl",
        "--unit=a.service",
        "-n",
        "10",
        "--no-pager",
    ]
    assert user.env["XDG_RUNTIME_DIR"] == "/run/user/1000"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_failed_unit_counts_as_launched_only_while_meant_to_run():
    failed = UnitState("a.service", M1, "h", "loaded", "failed", "failed")
    assert machine_state(Assignment("a.service", M1, "h", "launched"), failed) == "launched"
    assert machine_state(Assignment("a.service", M1, "h", "loaded"), failed) == "loaded"
    assert machine_state(Assignment("a.service", M1, "new", "launched"), failed) == "inactive"
    assert machine_state(Assignment("a.service", M1, "h", "launched"), None) == "inactive"


async def test_explain_replays_the_scheduler_for_one_unit(client, registry):
    db_only = HELLO + [{"section": "X-Fleet", "name": "MachineMetadata", "value": "region=us"}]
    await client.put("/fleet/v1/units/db.service", json={"desiredState": "launched", "options": db_only})
    await registry.assign(Assignment("db.service", M1, UnitFile.from_options(db_only).hash, "launched"))
    lines = (await (await client.get("/fleetpy/v1/units/db.service/explain")).json())["lines"]
    assert lines[0] == "db.service -> 113f16a7... : only machine that fits"
    assert "  excluded 2c9a1b3e... (metadata region=us does not match)" in lines
    assert lines[-1] == "  now on 113f16a7..."
    await client.put("/fleet/v1/units/idle.service", json={"desiredState": "inactive", "options": OTHER})
    lines = (await (await client.get("/fleetpy/v1/units/idle.service/explain")).json())["lines"]
    assert lines == ["idle.service is not scheduled: its desired state is inactive"]
    assert (await client.get("/fleetpy/v1/units/nope.service/explain")).status == 404


async def test_explain_reads_the_replaced_content(client, registry):
    pinned = HELLO + [{"section": "X-Fleet", "name": "MachineID", "value": M2}]
    await client.put("/fleet/v1/units/db.service", json={"desiredState": "launched", "options": HELLO})
    await (await client.get("/fleetpy/v1/units/db.service/explain")).json()
    await client.put("/fleet/v1/units/db.service", json={"desiredState": "launched", "options": pinned})
    lines = (await (await client.get("/fleetpy/v1/units/db.service/explain")).json())["lines"]
    assert lines[0].startswith("db.service -> 2c9a1b3e...")


async def test_cordon_is_a_registry_record_shown_on_the_machine(client, registry):
    assert (await client.put(f"/fleetpy/v1/machines/{M2}/cordon")).status == 204
    machines = (await (await client.get("/fleet/v1/machines")).json())["machines"]
    assert [m.get("cordoned", False) for m in machines] == [False, True]
    assert [m.cordoned for m in await registry.machines()] == [False, True]
    assert (await client.delete(f"/fleetpy/v1/machines/{M2}/cordon")).status == 204
    assert [m.cordoned for m in await registry.machines()] == [False, False]
    status, message = await error_of(await client.put("/fleetpy/v1/machines/nope/cordon"))
    assert (status, message) == (404, "machine nope not found; see 'fleetctl list-machines -l'")


async def test_plan_says_where_a_unit_would_go_and_writes_nothing(client, registry):
    db_only = HELLO + [{"section": "X-Fleet", "name": "MachineMetadata", "value": "region=us"}]
    response = await client.post("/fleetpy/v1/units/db.service/plan", json={"options": db_only})
    lines = (await response.json())["lines"]
    assert lines[0] == "db.service -> 113f16a7... : only machine that fits"
    assert "  excluded 2c9a1b3e... (metadata region=us does not match)" in lines
    assert await registry.jobs() == [] and await registry.assignments() == []
    # A submitted template's instance is planned from the template's file.
    await client.put("/fleet/v1/units/web@.service", json={"desiredState": "inactive", "options": db_only})
    lines = (await (await client.post("/fleetpy/v1/units/web@2.service/plan")).json())["lines"]
    assert lines[0] == "web@2.service -> 113f16a7... : only machine that fits"
    assert [j.name for j in await registry.jobs()] == ["web@.service"]
    status, message = await error_of(await client.post("/fleetpy/v1/units/web@.service/plan"))
    assert (status, message) == (400, "web@.service is a template; plan an instance such as web@1.service")
    status, message = await error_of(await client.post("/fleetpy/v1/units/nope.service/plan"))
    assert (status, message) == (404, "unit nope.service is not submitted; send its options to plan it")
    bad = [{"section": "X-Fleet", "name": "MachineOf", "value": "a b"}]
    assert (await client.post("/fleetpy/v1/units/x.service/plan", json={"options": bad})).status == 400


async def test_a_stored_unit_that_no_longer_parses_leaves_every_listing_working(client, registry):
    # B2: a unit text written by an older fleetd or by hand made GET /fleet/v1/units answer 400.
    digest = "f" * 40
    await registry.store.put(registry.key("unit", digest), "[Service]\nExecStart=/bin/true\r[oops\n")
    await registry.create_job(Job("bad.service", digest, "launched"))
    resp = await client.put(
        "/fleet/v1/units/good.service", json={"desiredState": "launched", "options": HELLO}
    )
    assert resp.status == 201
    resp = await client.get("/fleet/v1/units")
    assert resp.status == 200
    units = {u["name"]: u for u in (await resp.json())["units"]}
    assert units.keys() == {"bad.service", "good.service"}
    assert units["bad.service"]["options"] == [] and units["good.service"]["options"]
    resp = await client.get("/fleet/v1/units/bad.service")
    assert resp.status == 200
