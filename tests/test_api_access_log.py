"""fleetd's API logs one line per request only with debug logging (fleetd -v 1)."""

from __future__ import annotations

import logging

import httpx
import pytest

from fleetpy.api import create_app, serve
from fleetpy.registry import Machine, memory_registry

M1 = "1" * 32


async def _get_machines(tmp_path, tls) -> None:
    registry = memory_registry()
    await registry.register_machine(Machine(M1, "10.0.0.1"), ttl=60)
    sock = str(tmp_path / "fleet.sock")
    runner = await serve(create_app(registry, machine_id=M1), socket_path=sock)
    try:
        transport = httpx.AsyncHTTPTransport(uds=sock, verify=tls)
        async with httpx.AsyncClient(transport=transport, base_url="http://fleetd") as http:
            assert (await http.get("/fleet/v1/machines")).status_code == 200
    finally:
        await runner.cleanup()


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """(logger, line) of every access-log line, whichever logger wrote it."""
    return [(r.name, r.getMessage()) for r in caplog.records if '"GET /fleet/v1/machines' in r.getMessage()]


async def test_requests_are_not_logged_at_the_default_level(tmp_path, caplog, default_tls) -> None:
    caplog.set_level(logging.INFO)
    await _get_machines(tmp_path, default_tls)
    assert _access_lines(caplog) == []


async def test_debug_logging_logs_each_request(tmp_path, caplog, default_tls) -> None:
    caplog.set_level(logging.DEBUG)
    await _get_machines(tmp_path, default_tls)
    ((logger, line),) = _access_lines(caplog)
    assert logger == "fleetpy.api.access"
    assert '"GET /fleet/v1/machines HTTP/1.1" 200' in line
