"""The v3 backend fails over between etcd members without cancelling its callers.

When one call (here: the open watch) sees its member die, the store closes that connection and
dials the next member. gRPC cancels every other call still in flight on the closed channel with
asyncio.CancelledError; to the caller (a fleetd loop) that looked like being cancelled itself,
and ended it. Those calls must go again on the new connection instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path

import pytest

from fleetpy.lab.etcd import enable_auth, start_cluster
from fleetpy.registry.etcd3 import EtcdV3Store
from fleetpy.registry.store import Credentials, Unavailable

pytestmark = pytest.mark.integration


async def test_calls_in_flight_when_a_member_dies_go_again_on_the_next_member() -> None:
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="fleetpy-etcd-3-") as base:
        members = start_cluster(Path(base), 3)
        store = EtcdV3Store([m.client_url for m in members], retry_for=10)
        try:
            await store.put("/failover/a", "0")
            start = await store.index("/failover")
            watch = asyncio.create_task(store.wait("/failover", start, timeout=30))
            await asyncio.sleep(0.5)
            members[0].stop()  # the member the store talks to
            # Calls made at once race the watch noticing the dead member and failing over.
            for i in range(1, 6):
                await store.put("/failover/a", str(i))
            await store.put("/failover/b", "leased", ttl=30)
            assert await store.get("/failover/a") == "5"
            # The watch saw its stream break (an outage, to its caller); watched again from the
            # same revision, on the new member, nothing is missed.
            with contextlib.suppress(Unavailable):
                await watch
            assert await store.wait("/failover", start, timeout=5) == start + 1
        finally:
            await store.close()
            for member in members:
                member.stop()


async def test_a_store_that_logs_in_reaches_the_next_member_when_the_first_is_down() -> None:
    # Logging in is the first call on a member: a failed login must move on like a failed call.
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="fleetpy-etcd-3-") as base:
        members = start_cluster(Path(base), 3)
        try:
            enable_auth(members[0], "root-pw", {"fleet": "fleet-pw"}, "/failover/")
            members[0].stop()
            store = EtcdV3Store(
                [m.client_url for m in members],
                credentials=Credentials(username="fleet", password="fleet-pw"),
                retry_for=5,
            )
            try:
                await store.put("/failover/x", "1")
                assert await store.get("/failover/x") == "1"
            finally:
                await store.close()
        finally:
            for member in members:
                member.stop()
