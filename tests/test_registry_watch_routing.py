"""A fleetd's watches share one gRPC watch stream per etcd connection; each must get its own keys.

etcd answers a watch's creation with "created" and the watch's id; aetcd took the next such
answer for whichever watch it was creating at that moment. A waiter cancelled while its watch was
being created (the agent's word waking VolumeMoves, say) left its answer in flight, and the next
watch took it: that watch then saw the first watch's keys (a volume record read as a schedule
entry, "KeyError: 'unit'") and never its own (a volume move held in copying until something
else woke its agent). A watch is now opened to the end even when its caller leaves (53ad2da);
these tests reproduce the two symptoms as the lab showed them, and fail without that change.
A creation aetcd gave up on (its timeout) does the same, so the store then starts a new stream.
"""

from __future__ import annotations

import asyncio

import pytest

from fleetpy.registry import Registry

pytestmark = pytest.mark.integration


async def _cancel_while_created(registry: Registry, index: int, *parts: str) -> None:
    """Start a wait on `parts`, and cancel it once its watch's creation is on its way to etcd."""
    store = registry.store
    waiter = asyncio.ensure_future(registry.wait(index, *parts, timeout=30))
    async with asyncio.timeout(10):
        while store._connection is None or store._connection.watcher._new_callback is None:  # type: ignore[attr-defined]
            await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)


async def test_a_watch_created_after_one_whose_waiter_left_sees_only_its_own_keys(v3_registry) -> None:
    registry = v3_registry
    index = await registry.index()
    await _cancel_while_created(registry, index, "volumes")
    schedule = registry.key("schedule", "m1") + "/"
    changes = asyncio.ensure_future(registry.store.changes(schedule, index, timeout=10))
    await asyncio.sleep(0.3)  # the schedule's watch is open
    await registry.store.put(registry.key("volumes", "data"), '{"machine_id": "m1"}')
    await registry.store.put(schedule + "web.service", '{"unit": "web.service"}')
    seen = await changes
    assert [change.key for change in seen] == [schedule + "web.service"]


async def test_a_watch_wakes_for_its_own_keys_after_waiters_elsewhere_left_mid_creation(v3_registry) -> None:
    registry = v3_registry
    for attempt in range(3):
        directory = f"volumes-{attempt}"  # never watched yet: each wait below creates its watch
        index = await registry.index()
        await _cancel_while_created(registry, index, f"asked-facts-{attempt}")
        woken = asyncio.ensure_future(registry.wait(index, directory, timeout=10))
        await asyncio.sleep(0.3)
        revision = await registry.store.put(registry.key(directory, "data"), '{"machine_id": "m1"}')
        try:
            async with asyncio.timeout(5):
                assert await woken == revision
        finally:
            woken.cancel()
            await asyncio.gather(woken, return_exceptions=True)


async def test_a_record_at_a_schedules_own_key_is_quarantined_by_its_listing(v3_registry) -> None:
    # What the agent logged on the lab: a record named by the schedule's directory itself. The
    # listing does not take it for a unit; it leaves it aside under its path.
    registry = v3_registry
    await registry.store.put(registry.key("schedule", "m1", ""), '{"machine_id": "m1"}')
    assert await registry.assignments("m1") == []
    assert "schedule/m1/" in registry.unreadable


async def test_a_watch_whose_creation_timed_out_leaves_the_next_watch_its_own_keys(v3_registry) -> None:
    # etcd's late "created" answer to a creation aetcd gave up on (its watch timeout, 5 s on a
    # slow etcd) would go to the next watch created on that stream, another prefix's: the store
    # starts a new stream instead.
    registry = v3_registry
    store = registry.store
    store._retry_for = 0.5  # type: ignore[attr-defined]
    index = await registry.index()
    connection = store._connection or await store._connect()  # type: ignore[attr-defined]
    connection.watcher._timeout = 1e-9  # every creation on this stream times out
    await asyncio.gather(registry.wait(index, "asked-facts", timeout=0.5), return_exceptions=True)
    connection.watcher._timeout = 5.0
    schedule = registry.key("schedule", "m1") + "/"
    changes = asyncio.ensure_future(store.changes(schedule, index, timeout=10))
    await asyncio.sleep(0.3)  # the schedule's watch is open
    await store.put(registry.key("asked-facts"), "[]")
    await store.put(schedule + "web.service", '{"unit": "web.service"}')
    async with asyncio.timeout(10):
        seen = await changes
    assert [change.key for change in seen] == [schedule + "web.service"]
