"""The dashboard over a real etcd registry: the page, the explain view, live snapshots by
server-sent events, and the API's auth (a browser logs in with the token, kept as a cookie)."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest

from fleetpy.api import create_app, serve
from fleetpy.engine.engine import Engine
from fleetpy.registry import Job, Machine, UnitState
from fleetpy.unit import UnitFile

pytestmark = pytest.mark.integration

TOKEN = "dashboard-token"


@pytest.fixture
async def served(etcd_registry, tmp_path):
    registry = etcd_registry
    await registry.register_machine(Machine("m1aaaaaaaa", "10.0.0.1", {"role": "web"}), 60)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(registry, machine_id="m1aaaaaaaa")
    runner = await serve(
        app, socket_path=str(tmp_path / "fleet.sock"), listen=f"127.0.0.1:{port}", token=TOKEN
    )
    try:
        yield registry, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _start(registry, name):
    digest = await registry.put_unit_file(UnitFile.parse("[Service]\nExecStart=/bin/sleep 100\n"))
    await registry.create_job(Job(name, digest, "launched"))
    await Engine(registry, "m1aaaaaaaa", lease_ttl=5).reconcile()
    await registry.publish_state(UnitState(name, "m1aaaaaaaa", digest, "loaded", "active", "running"))


async def test_a_browser_logs_in_with_the_token_and_sees_units_machines_and_explain(served):
    registry, base = served
    await _start(registry, "web.service")
    async with httpx.AsyncClient(base_url=base) as browser:
        assert (await browser.get("/ui")).status_code == 401
        assert (await browser.post("/ui/login", data={"token": "wrong"})).status_code == 401
        login = await browser.post("/ui/login", data={"token": TOKEN})
        assert login.status_code == 303 and "fleetpy_token" in browser.cookies
        page = await browser.get("/ui")
        assert page.status_code == 200
        assert 'data-unit="web.service"' in page.text and 'class="healthy"' in page.text
        assert 'data-machine="m1aaaaaaaa"' in page.text and "role=web" in page.text
        assert "/ui/static/dashboard.js" in page.text and "http" not in page.text.split("<body>")[1]
        script = await browser.get("/ui/static/dashboard.js")
        assert script.status_code == 200 and "EventSource" in script.text
        explain = await browser.get("/ui/units/web.service")
        assert "web.service -&gt; m1aaaaaa" in explain.text and "UnitScheduled" not in explain.text


async def test_the_stream_pushes_a_snapshot_when_a_unit_starts(served):
    registry, base = served
    snapshots: list[dict] = []

    async def listen() -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with (
            httpx.AsyncClient(base_url=base, timeout=None) as client,
            client.stream("GET", "/ui/stream", headers=headers) as response,
        ):
            assert response.headers["Content-Type"] == "text/event-stream"
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    snapshots.append(json.loads(line[6:]))

    listener = asyncio.create_task(listen())
    try:
        for _ in range(100):
            if snapshots:
                break
            await asyncio.sleep(0.05)
        assert snapshots and snapshots[0]["units"] == []
        await _start(registry, "late.service")
        for _ in range(200):
            if any(
                u["name"] == "late.service" and u["activeState"] == "active" for u in snapshots[-1]["units"]
            ):
                break
            await asyncio.sleep(0.05)
        assert snapshots[-1]["units"][0]["health"] == "healthy"
    finally:
        listener.cancel()


async def test_streams_outlive_the_apis_request_deadline(served):
    """The event stream and the dashboard stream follow the cluster for as long as a client listens."""
    registry, base = served
    lines: list[str] = []

    async def listen(path: str) -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with (
            httpx.AsyncClient(base_url=base, timeout=None) as client,
            client.stream("GET", path, headers=headers) as response,
        ):
            async for line in response.aiter_lines():
                lines.append(line)

    app_deadline = 5.0  # Limits.registry_deadline
    listeners = [asyncio.create_task(listen(p)) for p in ("/ui/stream", "/fleetpy/v1/events?follow=true")]
    try:
        await asyncio.sleep(app_deadline + 1)
        await _start(registry, "after-deadline.service")
        for _ in range(100):
            if any("after-deadline.service" in line for line in lines):
                break
            await asyncio.sleep(0.05)
        assert any("after-deadline.service" in line for line in lines)
        assert not any(task.done() for task in listeners)
    finally:
        for task in listeners:
            task.cancel()
