"""`fleetctl volume move` end to end in one process: two fleetds (agent and engine as `fleetd`
builds them, over FakeSystemd and the memory registry), each serving its API on a unix socket
and on TCP with a token, and fetching a moving volume from the other as fleetd does (api.peer).
The volumes are real directories; tests/test_volumes_lab.py moves one on a real lab."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from click.testing import CliRunner

from fleetpy.agent.moves import unpack
from fleetpy.api import create_app, extensions, serve
from fleetpy.api.connections import LIMITS
from fleetpy.api.peer import FORWARDED_HEADER, Peers, peer_tls
from fleetpy.cli import fleetctl
from fleetpy.cli.fleetctl import cli
from fleetpy.client import APIError, Client
from fleetpy.engine.engine import Engine
from fleetpy.fleetd.config import Config
from fleetpy.fleetd.daemon import build_fleetd
from fleetpy.registry import (
    MOVE_COPYING,
    MOVE_FAILED,
    Assignment,
    Job,
    Machine,
    Registry,
    VolumeMove,
    VolumeRecord,
    memory_registry,
    moves,
)
from fleetpy.systemd import FakeSystemd
from fleetpy.unit import load_unit

pytest_plugins = ["fixtures_pki"]

M1 = "113f16a7" + "a" * 24
M2 = "2c9a1b3e" + "b" * 24
GONE = "ffee" + "0" * 28
TOKEN = "s3cret"
DB = "[Service]\nExecStart=/bin/sleep 1000\n[X-Fleet]\nVolume=data\nMachineID={}\n"


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Cluster:
    registry: Registry
    loop: asyncio.AbstractEventLoop
    sockets: dict[str, str]  # machine id -> unix endpoint
    tcp: dict[str, str]
    volumes: dict[str, Path]  # machine id -> volume dir
    apps: dict[str, web.Application]

    def call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def run(self, *args: str):
        return CliRunner().invoke(cli, ["--endpoint", self.sockets[M1], *args])

    def client(self, machine_id: str = M1) -> Client:
        return Client(self.sockets[machine_id])

    def where(self, unit: str) -> list[str]:
        return [a.machine_id for a in self.call(self.registry.assignments()) if a.unit == unit]

    def wait(self, what: str, condition, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = condition()
            if found:
                return found
            time.sleep(0.005)
        raise AssertionError(f"timed out waiting for {what}")


async def _start(registry: Registry, tmp_path: Path, pki: Path | None = None) -> tuple[list, list, Cluster]:
    """Two fleetds with their APIs; with `pki`, over https with the cluster CA and no token."""
    runners, tasks = [], []
    sockets, tcp, volumes, apps = {}, {}, {}, {}
    for machine_id, ip in ((M1, "10.0.0.1"), (M2, "10.0.0.2")):
        port = _port()
        volumes[machine_id] = tmp_path / machine_id[:4] / "volumes"
        cert, key = (str(pki / "server.pem"), str(pki / "server.key")) if pki else ("", "")
        config = Config(
            machine_id=machine_id,
            public_ip=ip,
            agent_ttl=600,
            api_listen=f"127.0.0.1:{port}",
            api_tls_cert=cert,
            api_tls_key=key,
            volume_dir=str(volumes[machine_id]),
        )
        token = None if pki else TOKEN
        tls = peer_tls(str(pki / "ca.pem"), cert, key) if pki else None
        app = create_app(
            registry, machine_id=machine_id, peer_token=token, peer_tls=tls, volume_dir=volumes[machine_id]
        )
        apps[machine_id] = app
        sock = tmp_path / f"{machine_id[:4]}.sock"
        secured = {"tls_cert": cert, "tls_key": key, "client_ca": str(pki / "ca.pem")} if pki else {}
        runners.append(
            await serve(app, socket_path=str(sock), listen=f"127.0.0.1:{port}", token=token, **secured)
        )
        scheme = "https" if pki else "http"
        sockets[machine_id], tcp[machine_id] = f"unix://{sock}", f"{scheme}://127.0.0.1:{port}"
        peers = Peers(registry, machine_id, token, tls)
        tasks.append(
            asyncio.create_task(build_fleetd(config, registry, FakeSystemd(), volume_source=peers).run())
        )
    while len(await registry.machines()) < 2:
        await asyncio.sleep(0.002)
    return runners, tasks, Cluster(registry, asyncio.get_running_loop(), sockets, tcp, volumes, apps)


async def _stop(runners: list, tasks: list) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch) -> Iterator[Cluster]:
    yield from _cluster(tmp_path, monkeypatch, None)


@pytest.fixture
def tls_cluster(tmp_path: Path, monkeypatch, pki: Path) -> Iterator[Cluster]:
    yield from _cluster(tmp_path, monkeypatch, pki)


def _cluster(tmp_path: Path, monkeypatch, pki: Path | None) -> Iterator[Cluster]:
    monkeypatch.setattr(fleetctl, "STARTUP_GRACE", 0.01)
    monkeypatch.setattr(fleetctl, "POLL_INTERVAL", 0.02)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    registry = memory_registry()
    runners, tasks, found = asyncio.run_coroutine_threadsafe(_start(registry, tmp_path, pki), loop).result(30)
    try:
        yield found
    finally:
        asyncio.run_coroutine_threadsafe(_stop(runners, tasks), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def _db_on_m1(cluster: Cluster, tmp_path: Path) -> Path:
    """db.service running on M1 with records in its volume; the volume's directory there."""
    unit = tmp_path / "db.service"
    unit.write_text(DB.format(M1))
    result = cluster.run("start", "--no-block", str(unit))
    assert result.exit_code == 0, result.output
    cluster.wait("db on M1", lambda: cluster.where("db.service") == [M1])
    volume = cluster.volumes[M1] / "data"
    cluster.wait("the volume on M1", volume.is_dir)
    (volume / "records").write_text("one\ntwo\n")
    (volume / "sub").mkdir()
    (volume / "sub" / "blob").write_bytes(os.urandom(100_000))
    # Pinned by its volume from now on, not by MachineID: drop that so it may move.
    cluster.call(_replace_unit(cluster.registry, "db.service", DB.replace("MachineID={}\n", "")))
    return volume


async def _replace_unit(registry: Registry, name: str, text: str) -> None:
    unit = load_unit(name, text)
    await registry.submit(unit.file, Job(name, unit.hash, "launched"), replace=True)


def test_a_volume_moves_with_its_data_and_its_unit_follows(cluster: Cluster, tmp_path: Path) -> None:
    source = _db_on_m1(cluster, tmp_path)
    blob = (source / "sub" / "blob").read_bytes()
    result = cluster.run("volume", "move", "data", M2[:8])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[:3] == [
        "Moving volume data from 113f16a7.../10.0.0.1 to 2c9a1b3e.../10.0.0.2",
        "Stopping the units using it on 113f16a7.../10.0.0.1",
        "Copying its data from 113f16a7.../10.0.0.1",
    ], result.output
    assert (
        lines[3].startswith("Volume data moved to 2c9a1b3e.../10.0.0.2 in ")
        and "its units start there" in lines[3]
    )
    target = cluster.volumes[M2] / "data"
    assert (target / "records").read_text() == "one\ntwo\n" and (target / "sub" / "blob").read_bytes() == blob
    cluster.wait("db on M2", lambda: cluster.where("db.service") == [M2])
    # The source's copy is kept, set aside where no unit will take it for the volume again.
    aside = cluster.wait("the old copy set aside", lambda: list(cluster.volumes[M1].glob("data~moved-*")))
    assert (aside[0] / "records").read_text() == "one\ntwo\n" and not source.exists()
    assert not list(cluster.volumes[M2].glob("data~*"))  # nothing left of the spool
    # Each machine answered its doorbell once its part was over: no key of the move is left.
    cluster.wait(
        "the doorbells answered", lambda: cluster.call(cluster.registry.all_volume_doorbells()) == {}
    )
    record = cluster.client().volume("data")
    assert record["machineID"] == M2 and record["move"]["state"] == "done"
    assert record["move"]["bytes"] == len("one\ntwo\n") + 100_000
    listed = cluster.run("list-volumes", "--no-legend").output
    assert listed.startswith("data\tlocal\t2c9a1b3e.../10.0.0.2\tmoved from 113f16a7... in "), listed
    cluster.wait(
        "the VolumeMoved event",
        lambda: "volume data moved from 113f16a7 to 2c9a1b3e" in cluster.run("events", "--no-legend").output,
    )
    # And back again: the old copy on M1 stays aside, the one coming back is the moved one.
    (target / "records").write_text("one\ntwo\nthree\n")
    result = cluster.run("volume", "move", "data", M1)
    assert result.exit_code == 0, result.output
    assert (source / "records").read_text() == "one\ntwo\nthree\n"
    cluster.wait("db on M1 again", lambda: cluster.where("db.service") == [M1])


def test_a_volume_moves_between_fleetds_that_prove_who_they_are_with_the_cluster_ca(
    tls_cluster: Cluster, tmp_path: Path
) -> None:
    # No token anywhere: the target's fleetd presents its certificate, and checks the source's.
    assert all(
        m.api_endpoint.startswith("https://") for m in tls_cluster.call(tls_cluster.registry.machines())
    )
    _db_on_m1(tls_cluster, tmp_path)
    result = tls_cluster.run("volume", "move", "data", M2)
    assert result.exit_code == 0, result.output
    assert (tls_cluster.volumes[M2] / "data" / "records").read_text() == "one\ntwo\n"
    tls_cluster.wait("db on M2", lambda: tls_cluster.where("db.service") == [M2])


def test_moving_a_volume_to_where_it_lives_is_a_clear_no_op(cluster: Cluster, tmp_path: Path) -> None:
    _db_on_m1(cluster, tmp_path)
    result = cluster.run("volume", "move", "data", M1[:6])
    assert result.exit_code == 0 and result.output == (
        "Volume data already lives on 113f16a7.../10.0.0.1; nothing to move\n"
    )
    assert cluster.where("db.service") == [M1] and cluster.client().volume("data")["move"] is None


def test_unknown_volumes_and_machines_and_bad_requests_are_refused_clearly(cluster: Cluster) -> None:
    result = cluster.run("volume", "move", "nope", M2)
    assert result.exit_code == 1 and "volume nope not found; see 'fleetctl list-volumes'" in result.output
    result = cluster.run("volume", "move", "nope", "ffff")
    assert result.exit_code == 1 and "0 machines match 'ffff'" in result.output
    client = cluster.client()
    with pytest.raises(APIError) as error:
        client.move_volume("data", GONE)
    assert error.value.code == 404 and f"machine {GONE} not found" in str(error.value)
    with pytest.raises(APIError) as error:
        client.move_volume("../etc", M2)
    assert error.value.code == 400 and "may hold only letters" in str(error.value)
    with pytest.raises(APIError) as error:
        client._request("POST", "/fleetpy/v1/volumes/data/move", json={"machine": M2})
    assert error.value.code == 400 and '{"machineID":' in str(error.value)
    # A shared volume has nothing to move.
    cluster.call(
        _replace_unit(
            cluster.registry, "web.service", "[Service]\nExecStart=/bin/true\n[X-Fleet]\nVolume=site:shared\n"
        )
    )
    result = cluster.run("volume", "move", "site", M2)
    assert (
        result.exit_code == 1
        and "volume site is shared (Volume=site:shared): every machine mounts" in result.output
    )
    # A volume whose machine is gone cannot be copied from it.
    cluster.call(cluster.registry.claim_volume("lost", GONE))
    with pytest.raises(APIError) as error:
        client.move_volume("lost", M2)
    assert error.value.code == 409 and "a machine that is gone: its data cannot be copied" in str(error.value)


def test_a_failed_copy_leaves_the_volume_and_its_unit_on_the_source_with_the_reason(
    cluster: Cluster, tmp_path: Path
) -> None:
    source = _db_on_m1(cluster, tmp_path)
    os.symlink("/etc/passwd", source / "outside")  # the target refuses to unpack a link out
    result = cluster.run("volume", "move", "data", M2)
    assert result.exit_code == 1, result.output
    assert (
        "Error: moving volume data failed: copying from 113f16a7... failed: refused member" in result.output
    )
    assert "a symlink out of the volume (to /etc/passwd); it stays on 113f16a7.../10.0.0.1" in result.output
    cluster.wait("db back on M1", lambda: cluster.where("db.service") == [M1])
    assert (source / "records").read_text() == "one\ntwo\n"
    assert not (cluster.volumes[M2] / "data").exists() and not list(cluster.volumes[M2].glob("data~*"))
    record = cluster.client().volume("data")
    assert record["machineID"] == M1 and record["move"]["state"] == "failed"
    cluster.wait(
        "the doorbells answered", lambda: cluster.call(cluster.registry.all_volume_doorbells()) == {}
    )
    listed = cluster.run("list-volumes", "--no-legend").output
    assert listed.startswith(
        "data\tlocal\t113f16a7.../10.0.0.1\tmove to 2c9a1b3e... failed: copying from 113f16a7..."
    ), listed
    cluster.wait(
        "the VolumeMoveFailed event",
        lambda: "VolumeMoveFailed" in cluster.run("events", "--no-legend").output,
    )
    # A move that failed is no obstacle to the next one.
    os.unlink(source / "outside")
    assert cluster.run("volume", "move", "data", M2).exit_code == 0
    cluster.wait("db on M2", lambda: cluster.where("db.service") == [M2])


def test_a_volume_is_served_only_while_it_is_copied_from_here_and_only_to_its_target(
    cluster: Cluster, tmp_path: Path, default_tls, monkeypatch
) -> None:
    import httpx

    def get(url: str, **kwargs) -> httpx.Response:
        return httpx.get(url, verify=default_tls, **kwargs)  # not a CA bundle load per request

    _db_on_m1(cluster, tmp_path)
    url = f"{cluster.tcp[M1]}/fleetpy/v1/volumes/data/data"
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    reply = get(url, headers={**bearer, FORWARDED_HEADER: M2})
    assert reply.status_code == 409 and "not being copied from this machine" in reply.text
    assert get(url).status_code == 401
    # Copying to a machine with no agent here (the engine gives it a lease's time to come back),
    # as far as the record says.
    copying = VolumeRecord(M1, VolumeMove(M1, GONE, MOVE_COPYING, time.time()))
    cluster.call(cluster.registry.store.put(cluster.registry.key("volumes", "data"), copying.to_text()))
    reply = get(url, headers={**bearer, FORWARDED_HEADER: M2})
    assert reply.status_code == 403 and "only the fleetd of machine ffee0000..." in reply.text
    reply = get(f"{cluster.tcp[M2]}/fleetpy/v1/volumes/data/data", headers={**bearer, FORWARDED_HEADER: GONE})
    assert reply.status_code == 409  # M2 is not the source
    reply = get(url, headers={**bearer, FORWARDED_HEADER: GONE})
    assert reply.status_code == 200 and reply.headers["Content-Type"] == "application/x-tar"
    unpack(io.BytesIO(reply.content), tmp_path / "fetched")
    assert (tmp_path / "fetched" / "data" / "records").read_text() == "one\ntwo\n"
    # A volume takes as long as it takes: the API's deadline for etcd does not cut its stream.
    deadline = 0.05
    object.__setattr__(cluster.apps[M1][LIMITS], "registry_deadline", deadline)  # this app's own, frozen

    async def slow(path: Path, write) -> int:  # type: ignore[no-untyped-def]
        for _ in range(5):  # three deadlines in all
            await write(b"x" * 10)
            await asyncio.sleep(deadline * 3 / 5)
        return 50

    monkeypatch.setattr(extensions, "stream", slow)
    reply = get(url, headers={**bearer, FORWARDED_HEADER: GONE})
    assert reply.status_code == 200 and reply.content == b"x" * 50
    # explain replays the scheduler with the move, as the engine plans.
    explained = cluster.run("explain", "db.service").output
    assert "volume data is moving from 113f16a7... to ffee0000..." in explained, explained
    # While it moves, it cannot be forgotten, nor moved again.
    with pytest.raises(APIError, match="is moving; wait"):
        cluster.client().forget_volume("data")
    with pytest.raises(APIError, match="already moving from 113f16a7... to ffee0000..."):
        cluster.client().move_volume("data", M2)


async def test_the_engine_fails_a_move_whose_target_is_gone_and_runs_the_unit_on_the_source() -> None:
    registry = memory_registry()
    await registry.register_machine(Machine(M1), ttl=600)
    unit = load_unit("db.service", DB.replace("MachineID={}\n", ""))
    await registry.submit(unit.file, Job("db.service", unit.hash, "launched"))
    await registry.assign(Assignment("db.service", M1, unit.hash, "launched"))
    await registry.claim_volume("data", M1)
    await registry.update_volume("data", moves.start("data", GONE, 100.0))
    engine = Engine(registry, M1, lease_ttl=10)
    # Just after a leader change the target may only be registering again: the move waits.
    engine._leading_since = engine.clock()
    await engine.reconcile()
    assert await registry.assignments() == [] and (await registry.volume_record("data")).moving is not None
    assert "volume data is moving from 113f16a7... to ffee0000..." in (await registry.pending())["db.service"]
    engine._leading_since = engine.clock() - 11
    await engine.reconcile()
    record = await registry.volume_record("data")
    assert record.machine_id == M1 and record.move.state == MOVE_FAILED
    assert record.move.reason == "target machine ffee0000... is gone"
    assert [a.machine_id for a in await registry.assignments()] == [M1]
    assert any(e.kind == "VolumeMoveFailed" for e in engine.events.recorder.queued)


def test_draining_the_volume_machine_says_how_to_move_the_volume_and_the_move_out_works(
    cluster: Cluster, tmp_path: Path
) -> None:
    _db_on_m1(cluster, tmp_path)
    result = cluster.run("drain", M1[:8])
    assert result.exit_code == 0, result.output
    assert "Unit db.service waiting for a machine: 0/2 machines fit: 1 machine is drained, 1 volume data" in (
        result.output
    )
    assert result.output.endswith(
        "Volume data lives on this machine: its units wait for it; move it with "
        "'fleetctl volume move data MACHINE', or 'fleetctl uncordon 113f16a7' to run them here again\n"
    )
    # The drained machine still serves the data: the volume leaves it, and its unit runs again.
    result = cluster.run("volume", "move", "data", M2)
    assert result.exit_code == 0, result.output
    cluster.wait("db on M2", lambda: cluster.where("db.service") == [M2])
    assert (cluster.volumes[M2] / "data" / "records").read_text() == "one\ntwo\n"
    # A drained machine takes no volume: its units could not run there.
    result = cluster.run("volume", "move", "data", M1)
    assert result.exit_code == 1 and "machine 113f16a7... is drained" in result.output
