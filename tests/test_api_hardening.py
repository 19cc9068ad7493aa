"""The API under hostile input and hostile clients: no 500s, bounded connections and time."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import ssl
import time
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from click.testing import CliRunner

from fleetpy.api import SystemctlUnitInfo, create_app, serve, serving
from fleetpy.api.auth import Auth, peer_proof, valid_peer_proof
from fleetpy.api.connections import LIMITS, AcceptErrorLog, Limits
from fleetpy.api.peer import peer_tls
from fleetpy.cli.fleetctl import cli as fleetctl
from fleetpy.fleetd.config import ConfigError, build_config
from fleetpy.fleetd.main import main as fleetd_main
from fleetpy.registry import Assignment, Job, Machine, NoQuorum, Registry, memory_registry
from fleetpy.unit import UnitFile

pytest_plugins = ["fixtures_pki"]

M1 = "113f16a7" + "0" * 24
HELLO = [{"section": "Service", "name": "ExecStart", "value": "/bin/sleep 1000"}]


@pytest.fixture
async def registry():
    reg = memory_registry()
    await reg.register_machine(Machine(M1, "10.0.0.1"), ttl=60)
    return reg


@pytest.fixture
async def client(registry):
    app = create_app(registry, machine_id=M1)
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


# --- serving: authentication on TCP ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
async def start_api(registry, tmp_path):
    """Serves `registry`'s API on tmp_path/fleet.sock and a free loopback TCP port with serve()'s
    `options`, and gives back the port; what it started stops after the test."""
    runners: list[web.AppRunner] = []

    async def start(**options) -> int:
        port = _free_port()
        app = create_app(registry, machine_id=M1)
        sock = str(tmp_path / "fleet.sock")
        runners.append(await serve(app, socket_path=sock, listen=f"127.0.0.1:{port}", **options))
        return port

    yield start
    for runner in runners:
        await runner.cleanup()


def _server_tls(pki: Path) -> dict[str, str]:
    """serve()'s options for HTTPS with the cluster CA's server certificate, clients checked by it."""
    return {
        "tls_cert": str(pki / "server.pem"),
        "tls_key": str(pki / "server.key"),
        "client_ca": str(pki / "ca.pem"),
    }


def _client_tls(pki: Path, cert: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if cert:
        context.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
    return context


async def test_tls_without_token_or_client_ca_is_refused(start_api, pki):
    # B5: a server certificate authenticates fleetd to clients, not clients to fleetd.
    with pytest.raises(ValueError, match="without authentication"):
        await start_api(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"))


async def test_insecure_tcp_serves_anyone_with_a_loud_warning(start_api, caplog, default_tls):
    port = await start_api(insecure=True)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", verify=default_tls) as http:
        assert (await http.get("/fleet/v1/machines")).status_code == 200
    assert "WITHOUT AUTHENTICATION" in caplog.text


async def test_client_certificate_signed_by_the_cluster_ca_is_let_in(start_api, pki):
    url = f"https://127.0.0.1:{await start_api(**_server_tls(pki))}/fleet/v1/machines"
    async with httpx.AsyncClient(verify=_client_tls(pki, "client")) as http:
        assert (await http.get(url)).status_code == 200
    for cert in (None, "stranger"):
        async with httpx.AsyncClient(verify=_client_tls(pki, cert)) as http:
            with pytest.raises(httpx.HTTPError):
                await http.get(url)


async def test_token_or_client_certificate_either_will_do(start_api, pki):
    url = f"https://127.0.0.1:{await start_api(token='t0ken', **_server_tls(pki))}/fleet/v1/machines"
    async with httpx.AsyncClient(verify=_client_tls(pki, None)) as http:
        refused = await http.get(url)
        assert refused.status_code == 401 and "client certificate" in refused.json()["error"]["message"]
        assert (await http.get(url, headers={"Authorization": "Bearer t0ken"})).status_code == 200
    async with httpx.AsyncClient(verify=_client_tls(pki, "client")) as http:
        assert (await http.get(url)).status_code == 200


# --- serving: slow and numerous clients -------------------------------------------------------


async def _closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), within) == b""
    except (TimeoutError, ConnectionError):
        return False


async def test_client_slow_to_send_its_request_head_is_cut_off(start_api, default_tls):
    port = await start_api(token="t0ken", limits=Limits(header_timeout=0.1))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /fleet/v1/machines HTTP/1.1\r\nHost: x\r\n")  # never finishes the head
    assert await _closed_by_server(reader, within=10)
    writer.close()
    # A prompt client on a kept-alive connection is not cut off while it is being answered.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", verify=default_tls) as http:
        for _ in range(3):
            resp = await http.get("/fleet/v1/machines", headers={"Authorization": "Bearer t0ken"})
            assert resp.status_code == 200


async def test_client_slow_to_send_its_body_gets_408(start_api):
    # However short the timeout, the body stays unfinished: the test need not wait for long.
    port = await start_api(token="t0ken", limits=Limits(body_timeout=0.01))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"PUT /fleet/v1/units/a.service HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    )
    head = await asyncio.wait_for(reader.readline(), 10)
    assert head.startswith(b"HTTP/1.1 408")
    writer.close()


async def test_tcp_connection_cap_keeps_the_unix_socket_answering(start_api, tmp_path, default_tls):
    # B6: idle TCP clients beyond the cap are closed at once; the unix socket has its own share.
    port = await start_api(token="t0ken", limits=Limits(tcp_connections=5, header_timeout=60))
    idle = []
    try:
        for _ in range(20):
            idle.append(await asyncio.open_connection("127.0.0.1", port))
        closed = [await _closed_by_server(reader, within=2) for reader, _ in idle[5:]]
        assert all(closed)
        transport = httpx.AsyncHTTPTransport(uds=str(tmp_path / "fleet.sock"), verify=default_tls)
        async with httpx.AsyncClient(transport=transport, base_url="http://fleetd") as http:
            assert (await http.get("/fleet/v1/machines")).status_code == 200
    finally:
        for _, writer in idle:
            writer.close()


def test_accept_errors_are_logged_at_most_once_per_interval(caplog):
    now = [0.0]
    handler = AcceptErrorLog(interval=10, now=lambda: now[0])
    loop = asyncio.new_event_loop()
    try:
        context = {"message": "socket.accept() out of system resource", "exception": OSError(24, "EMFILE")}
        for step in range(100):
            now[0] = step * 0.5  # 50 s of one failure every half second
            handler(loop, context)
    finally:
        loop.close()
    reports = [r for r in caplog.records if "cannot accept" in r.getMessage()]
    assert len(reports) == 5
    assert "19 more since the last report" in reports[1].getMessage()


# --- followed journals -----------------------------------------------------------------------


class FollowingLocal(SystemctlUnitInfo):
    """The real journal code, with a follower that writes one line and then waits forever."""

    def __init__(self, pid_file: Path):
        super().__init__("user")
        self.pid_file = pid_file

    def journal_argv(self, name: str, lines: int, follow: bool) -> list[str]:
        return ["sh", "-c", f'echo $$ > {self.pid_file}; echo "first line"; exec sleep 600']


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; its parent just has not reaped it yet.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


async def _follow(registry, tmp_path) -> tuple[web.AppRunner, str, Path]:
    digest = UnitFile.from_options(HELLO).hash
    await registry.put_unit_file(UnitFile.from_options(HELLO))
    await registry.create_job(Job("a.service", digest, "launched"))
    await registry.assign(Assignment("a.service", M1, digest, "launched"))
    pid_file = tmp_path / "follower.pid"
    sock = str(tmp_path / "fleet.sock")
    app = create_app(registry, machine_id=M1, local=FollowingLocal(pid_file))
    return await serve(app, socket_path=sock), sock, pid_file


async def _open_follow(sock: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(sock)
    writer.write(b"GET /fleetpy/v1/units/a.service/journal?follow=true HTTP/1.1\r\nHost: x\r\n\r\n")
    while b"first line" not in await asyncio.wait_for(reader.readline(), 10):
        pass
    return reader, writer


async def _gone(pid: int, within: float) -> bool:
    for _ in range(int(within / 0.005)):
        if not _alive(pid):
            return True
        await asyncio.sleep(0.005)
    return False


async def test_followed_journal_is_reaped_when_the_client_goes_away(registry, tmp_path):
    # B9: journalctl -f used to run on after its reader left.
    runner, sock, pid_file = await _follow(registry, tmp_path)
    try:
        _, writer = await _open_follow(sock)
        pid = int(pid_file.read_text())
        writer.close()
        assert await _gone(pid, within=10)
    finally:
        await runner.cleanup()


async def test_stopping_the_api_cuts_an_open_followed_journal(registry, tmp_path):
    # B9: with a journal -f open, fleetd took about 60 s to stop (aiohttp's shutdown timeout).
    runner, sock, pid_file = await _follow(registry, tmp_path)
    _, writer = await _open_follow(sock)
    pid = int(pid_file.read_text())
    started = time.monotonic()
    await asyncio.wait_for(runner.cleanup(), 30)
    stopped_in = time.monotonic() - started
    writer.close()
    assert await _gone(pid, within=10)
    assert stopped_in < 2, stopped_in  # the bound: fleetd stops within 2 s


def test_fleetd_refuses_unauthenticated_tcp_at_start(tmp_path, pki):
    # Refused before fleetd waits for etcd (none runs here), with what to do about it.
    base = ["--config", str(tmp_path / "none.conf"), "--etcd-servers", "http://127.0.0.1:9"]
    tls = ["--api-tls-cert", str(pki / "server.pem"), "--api-tls-key", str(pki / "server.key")]
    (tmp_path / "none.conf").write_text("")
    result = CliRunner().invoke(fleetd_main, [*base, "--api-listen", "127.0.0.1:0", *tls])
    assert result.exit_code == 2
    assert "needs authentication" in result.output and "api_insecure" in result.output
    assert build_config(
        {"api_listen": "127.0.0.1:0", "api_insecure": "true"}, {}, str(tmp_path / "none.conf")
    )
    with pytest.raises(ConfigError, match="needs TLS"):
        build_config({"api_tls_client_ca": str(pki / "ca.pem")}, {}, str(tmp_path / "none.conf"))


# --- peer forwarding -------------------------------------------------------------------------

M2 = "2c9a1b3e" + "0" * 24


class Recorder:
    """A stand-in for a peer's API that keeps the headers it is sent."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        return web.json_response({"name": "a.service", "machineID": M2, "status": "rogue\n"})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle)
        return app


async def _start(app: web.Application, port: int, tls: ssl.SSLContext | None = None) -> web.AppRunner:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start()
    return runner


async def _unit_on_m2(registry, endpoint: str) -> None:
    await registry.register_machine(Machine(M2, "10.0.0.2", {}, endpoint), ttl=60)
    digest = UnitFile.from_options(HELLO).hash
    await registry.put_unit_file(UnitFile.from_options(HELLO))
    await registry.create_job(Job("a.service", digest, "launched"))
    await registry.assign(Assignment("a.service", M2, digest, "launched"))


async def test_forwarding_never_sends_the_token_to_an_endpoint_from_etcd(registry, tmp_path):
    # B14: whoever can write etcd can point a machine's apiEndpoint at themselves.
    recorder, port = Recorder(), _free_port()
    rogue = await _start(recorder.app(), port)
    await _unit_on_m2(registry, f"http://127.0.0.1:{port}")
    app = create_app(registry, machine_id=M1, peer_token="s3cret-token")
    try:
        async with TestClient(TestServer(app)) as client:
            assert (await client.get("/fleetpy/v1/units/a.service/status")).status == 200
            await client.get("/fleetpy/v1/units/a.service/journal", params={"lines": "1"})
    finally:
        await rogue.cleanup()
    assert len(recorder.headers) == 2
    assert all("s3cret-token" not in "".join(h.values()) for h in recorder.headers)
    # What it collected opens nothing else: not another path, not another machine, not later.
    proof = recorder.headers[0]["Authorization"]
    auth = Auth(token="s3cret-token", machine_id=M2)
    status_path = f"/fleetpy/v1/units/a.service/status?machineID={M2}"
    assert _accepts(auth, "GET", status_path, proof)
    assert not _accepts(auth, "GET", "/fleetpy/v1/units/b.service/status", proof)
    assert not _accepts(auth, "PUT", status_path, proof)
    assert not _accepts(Auth(token="s3cret-token", machine_id=M1), "GET", status_path, proof)
    stale = peer_proof("s3cret-token", M2, "GET", status_path, now=time.time() - 3600)
    assert not _accepts(auth, "GET", status_path, stale)


def _accepts(auth: Auth, method: str, raw_path: str, given: str) -> bool:
    request = make_mocked_request(method, raw_path, headers={"Authorization": given})
    return valid_peer_proof(auth, request, given)


async def _serve_tls_peer(registry, tmp_path, pki, port: int) -> web.AppRunner:
    peer = create_app(registry, machine_id=M2, local=_Status())
    sock = str(tmp_path / "peer.sock")
    return await serve(peer, socket_path=sock, listen=f"127.0.0.1:{port}", **_server_tls(pki))


class _Status:
    async def status(self, name: str) -> str:
        return f"* {name} - running on the real peer\n"


async def test_with_a_cluster_ca_peers_must_prove_who_they_are(registry, tmp_path, pki):
    port, rogue_port = _free_port(), _free_port()
    peer = await _serve_tls_peer(registry, tmp_path, pki, port)
    recorder = Recorder()
    rogue_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    rogue_tls.load_cert_chain(str(pki / "rogue.pem"), str(pki / "rogue.key"))
    rogue = await _start(recorder.app(), rogue_port, rogue_tls)
    tls = peer_tls(str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key"))
    app = create_app(registry, machine_id=M1, peer_tls=tls)
    try:
        async with TestClient(TestServer(app)) as client:
            await _unit_on_m2(registry, f"https://127.0.0.1:{port}")
            body = await (await client.get("/fleetpy/v1/units/a.service/status")).json()
            assert body["status"] == "* a.service - running on the real peer\n"  # mTLS both ways
            await registry.register_machine(
                Machine(M2, "10.0.0.2", {}, f"https://127.0.0.1:{rogue_port}"), ttl=60
            )
            resp = await client.get("/fleetpy/v1/units/a.service/status")
            assert resp.status == 502 and "not who it claims" in (await resp.json())["error"]["message"]
            await registry.register_machine(
                Machine(M2, "10.0.0.2", {}, f"http://127.0.0.1:{rogue_port}"), ttl=60
            )
            resp = await client.get("/fleetpy/v1/units/a.service/journal")
            assert resp.status == 502 and "is not https" in (await resp.json())["error"]["message"]
    finally:
        await rogue.cleanup()
        await peer.cleanup()
    assert recorder.headers == []


async def test_fleetctl_speaks_mtls(start_api, pki):
    port = await start_api(**_server_tls(pki))
    base = ["--endpoint", f"https://127.0.0.1:{port}", "--ca-file", str(pki / "ca.pem")]
    cert = ["--cert-file", str(pki / "client.pem"), "--key-file", str(pki / "client.key")]
    admitted = await asyncio.to_thread(CliRunner().invoke, fleetctl, [*base, *cert, "list-machines"])
    refused = await asyncio.to_thread(CliRunner().invoke, fleetctl, [*base, "list-machines"])
    assert admitted.exit_code == 0 and "113f16a7..." in admitted.output, admitted.output
    assert refused.exit_code == 1 and "TLS failed: check --ca-file" in refused.output, refused.output


class HeldSubmits:
    """A registry whose submits wait until the test lets them through, as etcd's do when it is
    struggling."""

    def __init__(self, inner: Registry):
        self.inner = inner
        self.released = asyncio.Event()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    async def submit(self, unit_file, job: Job, *, replace: bool = False) -> None:
        await self.released.wait()
        await self.inner.submit(unit_file, job, replace=replace)


async def test_a_replace_past_the_deadline_still_completes(registry):
    # The deadline answers 503, but the replace goes on and completes.
    held = HeldSubmits(registry)
    app = create_app(held, machine_id=M1)
    app[LIMITS] = Limits(registry_deadline=0.05)  # the submit is held until after the 503
    other = [{"section": "Service", "name": "ExecStart", "value": "/bin/true"}]
    async with TestClient(TestServer(app)) as client:
        await registry.put_unit_file(UnitFile.from_options(HELLO))
        await registry.create_job(Job("a.service", UnitFile.from_options(HELLO).hash, "launched"))
        resp = await client.put(
            "/fleet/v1/units/a.service", json={"desiredState": "launched", "options": other}
        )
        assert resp.status == 503 and "may yet be made" in (await resp.json())["error"]["message"]
        held.released.set()
        for _ in range(1000):
            if (await registry.job("a.service")).hash == UnitFile.from_options(other).hash:
                break
            await asyncio.sleep(0.005)
    assert (await registry.job("a.service")).hash == UnitFile.from_options(other).hash


async def test_a_request_past_the_deadline_says_when_etcd_lost_its_quorum(registry):
    class Quorumless(HeldSubmits):
        def outage(self):
            return NoQuorum("etcd has lost its quorum: the member at http://x answers but has no leader")

    held = Quorumless(registry)
    app = create_app(held, machine_id=M1)
    app[LIMITS] = Limits(registry_deadline=0.01)  # the submit is held: the deadline always passes
    async with TestClient(TestServer(app)) as client:
        resp = await client.put(
            "/fleet/v1/units/a.service", json={"desiredState": "launched", "options": HELLO}
        )
        error = (await resp.json())["error"]
        held.released.set()
    assert resp.status == 503 and error["reason"] == "etcdUnreachable"
    assert error["message"] == (
        "etcd has lost its quorum: the member at http://x answers but has no leader; units already "
        "running keep running, but nothing is scheduled, started, stopped or changed until then; "
        "fleetd keeps retrying; your change is still being tried and may yet be made"
    )


def test_tcp_cap_leaves_descriptors_for_the_unix_socket_and_fleetd(monkeypatch, caplog):
    # systemd's default soft limit is 1024: TCP gets what is left after the unix socket's share.
    monkeypatch.setattr(serving.resource, "getrlimit", lambda _: (1024, 524288))
    assert serving.tcp_connection_limit(Limits()) == 1024 - 128 - serving.RESERVED_FDS
    assert "raise LimitNOFILE=" in caplog.text
    monkeypatch.setattr(serving.resource, "getrlimit", lambda _: (65536, 524288))
    assert serving.tcp_connection_limit(Limits()) == Limits().tcp_connections


@pytest.mark.parametrize("stamp", ["²", "9" * 5000, "-1", ""])
async def test_a_malformed_peer_proof_is_401_not_500(start_api, stamp, default_tls):
    port = await start_api(token="t0ken")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", verify=default_tls) as http:
        proof = f"Fleetpy-Peer {stamp} {'0' * 64}".encode()
        resp = await http.get("/fleet/v1/machines", headers={"Authorization": proof})
        assert resp.status_code == 401


async def test_refused_changes_are_not_logged(client, caplog):
    # Logging every 400 would let any client fill fleetd's log.
    resp = await client.put("/fleet/v1/units/x.service", json={"options": {"a": 1}})
    assert resp.status == 400
    assert "failed after its request ended" not in caplog.text
