"""Benchmark: a flood of slow TCP clients against fleetd's API (B6), on loopback only.

The API runs in a child process with a small descriptor limit, serving TCP and the unix socket
over the in-memory registry, logging as fleetd does. The bench opens `--clients` TCP
connections that each send half a request head and then nothing (slowloris), keeps them for
`--hold` seconds, and meanwhile times requests over the unix socket. It reports the server's
open descriptors, the unix-socket latency and failures, and the bytes the server logged.

Baseline in the same run: the same server with the guards switched off (no connection cap,
no request-head deadline, asyncio's own accept-error logging), as the API was before.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

SERVER = r"""
import asyncio, logging, resource, sys
from fleetpy.api import create_app, serve
from aiohttp import web
from fleetpy.api.auth import AUTH
from fleetpy.registry import Machine, memory_registry

socket_path, port, nofile, guarded = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "on"
resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")

async def main():
    registry = memory_registry()
    await registry.register_machine(Machine("m1", "127.0.0.1"), ttl=3600)
    app = create_app(registry, machine_id="m1")
    if guarded:
        await serve(app, socket_path=socket_path, listen=f"127.0.0.1:{port}", token="bench")
    else:  # the API's serving as it was: aiohttp's own sites, no guards
        app[AUTH].token = "bench"
        runner = web.AppRunner(app)
        await runner.setup()
        await web.UnixSite(runner, socket_path).start()
        await web.TCPSite(runner, "127.0.0.1", int(port)).start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _slow_client(port: int, held: list) -> None:
    try:
        # A server that stopped accepting leaves connects in the SYN backlog: give up on those.
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 3)
        writer.write(b"GET /fleet/v1/machines HTTP/1.1\r\nHost: x\r\n")
        held.append(writer)
    except (OSError, TimeoutError):
        pass


async def _unix_probe(socket_path: str, seconds: float) -> tuple[list[float], int]:
    latencies, failures = [], 0
    transport = httpx.AsyncHTTPTransport(uds=socket_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://fleetd", timeout=5) as http:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.monotonic()
            try:
                (await http.get("/fleet/v1/machines")).raise_for_status()
                latencies.append(time.monotonic() - started)
            except httpx.HTTPError:
                failures += 1
            await asyncio.sleep(0.2)
    return latencies, failures


async def _run(guarded: bool, clients: int, hold: float, nofile: int, workdir: Path) -> dict:
    sock, port, log = str(workdir / f"api-{guarded}.sock"), _free_port(), workdir / f"api-{guarded}.log"
    with open(log, "wb") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER, sock, str(port), str(nofile), "on" if guarded else "off"],
            stdout=subprocess.PIPE,
            stderr=log_file,
        )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
        idle_latencies, _ = await _unix_probe(sock, 2)
        log_before = log.stat().st_size
        held: list = []
        started = time.monotonic()
        for start in range(0, clients, 500):  # bounded: `clients` connections, 500 at a time
            await asyncio.gather(*(_slow_client(port, held) for _ in range(start, min(start + 500, clients))))
        opened_in = time.monotonic() - started
        probe = asyncio.create_task(_unix_probe(sock, hold))
        peak_fds = 0
        while not probe.done():
            peak_fds = max(peak_fds, _open_fds(server.pid))
            await asyncio.sleep(0.5)
        latencies, failures = probe.result()
        log_bytes = log.stat().st_size - log_before
        for writer in held:
            writer.close()
        return {
            "guards": "on" if guarded else "off (baseline)",
            "clients_opened": len(held),
            "seconds_to_open": round(opened_in, 2),
            "server_fd_limit": nofile,
            "server_peak_open_fds": peak_fds,
            "unix_ms_idle_median": round(statistics.median(idle_latencies) * 1000, 2),
            "unix_ms_flood_median": round(statistics.median(latencies) * 1000, 2) if latencies else None,
            "unix_ms_flood_max": round(max(latencies) * 1000, 2) if latencies else None,
            "unix_ok": len(latencies),
            "unix_failed": failures,
            "log_bytes_during_flood": log_bytes,
            "log_bytes_per_minute": round(log_bytes * 60 / (time.monotonic() - started)),
        }
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3000)
    parser.add_argument("--hold", type=float, default=15.0, help="seconds the flood is held")
    parser.add_argument("--server-fd-limit", type=int, default=2048)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleetpy-flood-") as workdir:
        results = [
            await _run(guarded, args.clients, args.hold, args.server_fd_limit, Path(workdir))
            for guarded in (False, True)
        ]
    print(
        json.dumps(
            {"bench": "api_flood", "clients": args.clients, "hold_s": args.hold, "runs": results}, indent=2
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
