"""The v3 backend fails over between etcd members without cancelling its callers, and tells an
etcd that lost its quorum from one that is down.

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

from fleetpy.lab.etcd import enable_auth, initial_cluster, start_cluster
from fleetpy.registry.etcd3 import EtcdV3Store
from fleetpy.registry.store import Credentials, NoQuorum, Unavailable

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


async def test_etcd_without_quorum_is_told_apart_from_etcd_down_and_forgotten_when_back() -> None:
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="fleetpy-etcd-3-") as base:
        members = start_cluster(Path(base), 3)
        urls = [m.client_url for m in members]
        store = EtcdV3Store(urls, retry_for=3)
        try:
            await store.put("/quorum/a", "1")
            assert store.outage() is None
            members[0].stop()
            members[1].stop()
            for _ in range(200):  # until it noticed that its leader is gone (~0.5 s)
                if not members[2].healthy():
                    break
                await asyncio.sleep(0.05)
            # The member left has no leader: it says so at once, where a request without
            # etcd's "hasleader" would wait out its whole timeout on it.
            with pytest.raises(NoQuorum) as lost:
                await store.get("/quorum/a")
            assert str(lost.value) == (
                f"etcd has lost its quorum: the member at {urls[2]} answers but has no leader, and the "
                f"members at {urls[0]}, {urls[1]} do not answer; etcd takes no reads or writes until a "
                "majority of its members is back"
            )
            assert isinstance(store.outage(), NoQuorum)
            members[2].stop()
            with pytest.raises(Unavailable) as down:
                await store.get("/quorum/a")
            assert not isinstance(down.value, NoQuorum) and "etcd is unreachable at" in str(down.value)
            initial = initial_cluster(members)
            for member in members:
                member.start(initial)
            store_back = EtcdV3Store(urls, retry_for=20)
            try:
                assert await store_back.get("/quorum/a") == "1"
            finally:
                await store_back.close()
            assert await store.get("/quorum/a") == "1"
            assert store.outage() is None
        finally:
            await store.close()
            for member in members:
                member.stop()


async def test_a_wait_cancelled_while_its_watch_is_created_leaves_the_next_watch_its_own_changes() -> None:
    # fleetd's agent cancels its wait on volumes/ after each reconcile pass; cancelled while
    # aetcd was creating the watch, it used to hand that watch to the next creation on the
    # stream (the schedule's), whose own changes then never came: an agent that never ran its
    # units.
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="fleetpy-etcd-1-") as base:
        members = start_cluster(Path(base), 1)
        store = EtcdV3Store([members[0].client_url], retry_for=5)
        try:
            await store.put("/cancel/start", "1")
            for ticks in range(12):
                index = await store.index("/cancel")
                abandoned = asyncio.create_task(store.wait(f"/cancel/a{ticks}", index, timeout=30))
                for _ in range(ticks):
                    await asyncio.sleep(0)
                abandoned.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await abandoned
                waiting = asyncio.create_task(store.wait(f"/cancel/b{ticks}", index, timeout=10))
                await asyncio.sleep(0.05)
                written = await store.put(f"/cancel/b{ticks}/x", "1")
                assert await waiting == written, f"the watch on b{ticks} missed its write"
        finally:
            await store.close()
            members[0].stop()
