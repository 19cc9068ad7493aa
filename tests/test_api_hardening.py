"""The API under hostile input and hostile clients: no 500s, bounded connections and time."""

from __future__ import annotations

import base64
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from fleetpy.api import create_app
from fleetpy.registry import Machine, memory_registry
from fleetpy.registry.aio import AsyncRegistry

M1 = "113f16a7" + "0" * 24
HELLO = [{"section": "Service", "name": "ExecStart", "value": "/bin/sleep 1000"}]


@pytest.fixture
def registry():
    reg = memory_registry()
    reg.register_machine(Machine(M1, "10.0.0.1"), ttl=60)
    return reg


@pytest.fixture
async def client(registry):
    app = create_app(AsyncRegistry(registry), machine_id=M1)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


def _token(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode()


@pytest.mark.parametrize(
    "token",
    [_token({"after": 5}), _token({"after": None}), _token({"after": ["a"]}), _token("after"), _token([1])],
)
@pytest.mark.parametrize("path", ["/fleet/v1/units", "/fleet/v1/state", "/fleet/v1/machines"])
async def test_page_token_of_the_wrong_shape_is_400(client, path, token):
    await client.put("/fleet/v1/units/a.service", json={"desiredState": "inactive", "options": HELLO})
    resp = await client.get(path, params={"nextPageToken": token})
    assert resp.status == 400
    assert "nextPageToken" in (await resp.json())["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path"), [("PUT", "/fleet/v1/units/a.service"), ("PATCH", "/fleet/v1/machines")]
)
async def test_deeply_nested_body_is_400(client, method, path):
    body = "[" * 100_000 + "]" * 100_000
    resp = await client.request(method, path, data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert "nested too deeply" in (await resp.json())["error"]["message"]
