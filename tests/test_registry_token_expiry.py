"""The v3 backend logs in again when etcd's auth token expires, and the caller never notices.

etcd hands out "simple" tokens that expire after `--auth-token-ttl` seconds without use (300 s
by default). A fleetd whose registry sits idle longer than that holds a dead token; its next
request fails with "invalid auth token" unless the store logs in again. Here etcd runs with a
2 s token TTL, so one quiet spell of 3 s is enough to make every held token stale.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import grpc
import pytest
from aetcd import rpc

from fleetpy.lab.etcd import enable_auth, start_cluster
from fleetpy.registry import Credentials, Machine, Registry
from fleetpy.registry.etcd3 import EtcdV3Store

pytestmark = pytest.mark.integration

PREFIX = "/expiry/"
TOKEN_TTL = 2  # seconds
QUIET = TOKEN_TTL + 1.5


@pytest.fixture(scope="module")
def short_token_etcd():
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="fleetpy-etcd-ttl-") as base:
        members = start_cluster(Path(base), extra_args=("--auth-token-ttl", str(TOKEN_TTL)))
        try:
            enable_auth(members[0], "root-pw", {"fleet": "fleet-pw"}, PREFIX)
            yield members[0].client_url
        finally:
            for member in members:
                member.stop()


def fleet_store(url: str) -> EtcdV3Store:
    return EtcdV3Store([url], credentials=Credentials(username="fleet", password="fleet-pw"), retry_for=5)


async def held_token_is_refused(store: EtcdV3Store) -> bool:
    """Whether etcd now refuses the token the store logged in with (asked directly, no retry)."""
    connection = store._connection
    assert connection is not None and connection.metadata is not None
    try:
        await connection.kv.Range(rpc.RangeRequest(key=PREFIX.encode()), metadata=connection.metadata)
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
        return True
    return False


async def test_every_kind_of_request_logs_in_again_after_the_token_expired(short_token_etcd):
    registry = Registry(fleet_store(short_token_etcd), PREFIX + "ops")
    try:
        await registry.ensure_schema()
        await registry.register_machine(Machine("m1", "10.0.0.1"), ttl=30)
        for step in ("read", "create-only", "lease refresh", "new watch", "waiting watch", "write"):
            await asyncio.sleep(QUIET)
            assert await held_token_is_refused(registry.store), "the token did not expire; test is void"
            if step == "read":
                assert [m.id for m in await registry.machines()] == ["m1"]
            elif step == "create-only":
                await registry.store.put(PREFIX + "ops/lock", "me", create_only=True, ttl=30)
                assert await registry.store.get(PREFIX + "ops/lock") == "me"
            elif step == "lease refresh":
                assert await registry.refresh_machine("m1", ttl=30)
            elif step == "new watch":
                # etcd refuses a watch created on a stream whose token expired ("permission
                # denied", as a canceled watch): the store logs in again and watches anew.
                start = await registry.index()
                await asyncio.sleep(QUIET)
                watch = asyncio.create_task(registry.store.wait(PREFIX + "ops", start, timeout=10))
                await asyncio.sleep(0.5)
                await registry.store.put(PREFIX + "ops/poke", "1")
                assert await watch == start + 1
            elif step == "waiting watch":
                # A watch waits while the token expires; the next write logs in again, which
                # closes the old stream under the waiter: it goes on, on the new one.
                start = await registry.index()
                watch = asyncio.create_task(registry.store.wait(PREFIX + "ops", start, timeout=15))
                await asyncio.sleep(QUIET)
                assert await held_token_is_refused(registry.store)
                await registry.store.put(PREFIX + "ops/poke", "2")
                assert await watch == start + 1
            else:
                await registry.store.put(PREFIX + "ops/after", "1")
                assert await registry.store.get(PREFIX + "ops/after") == "1"
    finally:
        await registry.store.delete(PREFIX + "ops", recursive=True)
        await registry.close()
