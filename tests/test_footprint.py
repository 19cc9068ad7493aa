"""fleetd and fleetctl import only what they run: each module below cost start-up time or memory
(bench/cli.py and bench/fleetd.py measure how much), so a fresh interpreter proves it is absent."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # fresh interpreters as subprocesses

# Tools around the core, and libraries only some fleetds or only the first request need.
NOT_AT_FLEETD_START = (
    "fleetpy.lab",
    "fleetpy.cloudinit",
    "fleetpy.containers",
    "fleetpy.client",
    "jinja2",  # the dashboard's pages, on first view
    "prometheus_client",  # /metrics, on first scrape
    "httpx",
    "yaml",
    "etcd",  # python-etcd: only for a registry on etcd's v2 API
    "aetcd",  # gRPC: only for a registry on etcd's v3 API
    "grpc",
)

# fleetd's start-up up to serving its API on the unix socket, over the memory registry.
FLEETD_START = """
import asyncio, sys, tempfile
import fleetpy.fleetd.main
from fleetpy.api import create_app, serve
from fleetpy.registry import memory_registry

async def start():
    with tempfile.TemporaryDirectory() as base:
        runner = await serve(create_app(memory_registry(), machine_id="1" * 32), socket_path=base + "/fleet.sock")
        await runner.cleanup()

asyncio.run(start())
print(" ".join(sorted(sys.modules)))
"""


def loaded(code: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return set(done.stdout.split())


def test_fleetd_serving_its_api_has_imported_no_tool_and_no_etcd_client() -> None:
    modules = loaded(FLEETD_START)
    assert "fleetpy.fleetd.main" in modules and "aiohttp" in modules
    found = {name for name in NOT_AT_FLEETD_START if name in modules}
    assert found == set()


def test_fleetctl_imports_neither_the_core_nor_ssh_s_helpers() -> None:
    modules = loaded("import sys, fleetpy.cli.fleetctl; print(' '.join(sorted(sys.modules)))")
    assert "click" in modules and "fleetpy.client.http" in modules
    # http.client would bring the email package and ssl: 15 ms of a 62 ms start.
    found = {
        name
        for name in (*NOT_AT_FLEETD_START, "shutil", "fleetpy.api", "fleetpy.registry", "http.client", "ssl")
        if name in modules
    }
    assert found - {"fleetpy.client"} == set()
