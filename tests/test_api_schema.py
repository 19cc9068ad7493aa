"""schemathesis fuzzes fleetd's API from its own OpenAPI document, over a real etcd registry.

The requests are counted by status on the server's side, so the numbers do not depend on what
the fuzzer reports: at least 1,000 requests, and not one answered with a 5xx.
"""

from __future__ import annotations

import asyncio
import collections
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from fleetpy.api import create_app, serve
from fleetpy.api.openapi import document
from fleetpy.registry import Machine, memory_registry

pytestmark = pytest.mark.integration

M1 = "113f16a7" + "0" * 24
M2 = "2c9a1b3e" + "0" * 24
TOKEN = "schema-t0ken"
MIN_REQUESTS = 1000


class FiniteLocal:
    """Status and journal of local units; a followed journal ends, or the fuzzer would wait."""

    async def status(self, name: str) -> str:
        return f"* {name}\n"

    async def journal(self, name: str, lines: int, follow: bool) -> AsyncIterator[str]:
        for i in range(min(lines, 3)):
            yield f"line {i}\n"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_document_describes_every_route():
    app = create_app(memory_registry(), machine_id=M1)
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD"
        and route.resource is not None
        # The JSON API; /metrics (Prometheus' text) and /ui (the dashboard's pages) are not part of it.
        and route.resource.canonical.startswith(("/fleet/", "/fleetpy/"))
    }
    described = {
        (method.upper(), path)
        for path, item in document()["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert served == described


async def test_schemathesis_finds_no_server_error(etcd_registry, tmp_path):
    st = shutil.which("st", path=str(Path(__file__).parents[1] / ".venv" / "bin")) or shutil.which("st")
    assert st, "schemathesis is missing: run scripts/setup --test (it is in the test extra)"
    await etcd_registry.register_machine(Machine(M1, "10.0.0.1", {"region": "us"}), ttl=600)
    await etcd_registry.register_machine(Machine(M2, "10.0.0.2"), ttl=600)
    statuses: collections.Counter[int] = collections.Counter()

    @web.middleware
    async def count(request: web.Request, handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as error:
            statuses[error.status] += 1
            raise
        statuses[response.status] += 1
        return response

    app = create_app(etcd_registry, machine_id=M1, local=FiniteLocal())
    app.middlewares.insert(0, count)
    port = _free_port()
    runner = await serve(
        app, socket_path=str(tmp_path / "fleet.sock"), listen=f"127.0.0.1:{port}", token=TOKEN
    )
    try:
        process = await asyncio.create_subprocess_exec(
            st, "run", f"http://127.0.0.1:{port}/fleet/v1/openapi.json",
            "--checks", "not_a_server_error", "--mode", "all", "--max-examples", "60", "--seed", "9",
            "--header", f"Authorization: Bearer {TOKEN}", "--no-color",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
        )  # fmt: skip
        output, _ = await process.communicate()
    finally:
        await runner.cleanup()
    report = output.decode(errors="replace")
    total = sum(statuses.values())
    server_errors = {code: n for code, n in statuses.items() if code >= 500}
    print(f"schemathesis: {total} requests, by status {dict(sorted(statuses.items()))}")
    assert process.returncode == 0, report[-4000:]
    assert server_errors == {}, report[-4000:]
    assert total >= MIN_REQUESTS, report[-4000:]
