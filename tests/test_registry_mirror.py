"""The watch-fed copy of the registry (`Mirror`, `MirrorStore`) and the store's `changes`, on
every backend: memory, etcd v2, etcd v3 (3.4 and 3.5)."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from fleetpy.registry import Assignment, HistoryLost, Job, Machine, Registry
from fleetpy.registry.mirror import Mirror, MirrorStore
from fleetpy.registry.store import Change
from fleetpy.unit import UnitFile
from tests.test_registry import forget_history


@pytest.fixture
def registry(any_registry):
    return any_registry


async def _until(predicate, timeout=5.0):
    async def check():
        while not predicate():
            await asyncio.sleep(0.002)

    await asyncio.wait_for(check(), timeout)


class CountingStore:
    """The registry's store, counting the calls made to it by name."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: Counter = Counter()

    def __getattr__(self, name):
        attribute = getattr(self.inner, name)
        if not callable(attribute) or name.startswith("_"):
            return attribute

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return attribute(*args, **kwargs)

        return counted


async def test_changes_carry_each_write_with_its_value_and_deletes_as_none(registry, elapse):
    start = await registry.index()
    a, b = registry.key("job", "a"), registry.key("job", "b")
    await registry.store.put(a, "1")
    await registry.store.put(b, "2")
    await registry.store.delete(a)
    seen: list[Change] = []
    index = start
    while (a, None) not in [(c.key, c.value) for c in seen]:
        found = await registry.store.changes(registry.key("job"), index, timeout=5)
        assert found, "a write was not seen within 5 s"
        seen += found
        index = found[-1].index
    # In order; etcd v2, which hands out its history one change per request, leaves out a's
    # first write: the deletion had undone it by the time it was read.
    pairs = [(c.key, c.value) for c in seen]
    assert [p for p in pairs if p != (a, "1")] == [(b, "2"), (a, None)]
    assert start < seen[0].index and [c.index for c in seen] == sorted({c.index for c in seen})
    nothing_more = asyncio.create_task(registry.store.changes(registry.key("job"), index, timeout=0.2))
    await elapse(0.2)
    assert await asyncio.wait_for(nothing_more, 5) == []


async def test_changes_from_a_forgotten_index_report_history_lost(registry):
    start = await registry.index()
    await forget_history(registry)
    with pytest.raises(HistoryLost):
        await registry.store.changes(registry.key("job"), start, timeout=1)


async def test_the_mirror_lists_once_then_follows_writes_and_deletes(registry):
    store = CountingStore(registry.store)
    await registry.register_machine(Machine("m1"), ttl=60)
    mirror = Mirror(store, registry.prefix, skip=("state",))
    task = asyncio.create_task(mirror.run())
    try:
        await _until(lambda: mirror.synced)
        view = Registry(MirrorStore(mirror), registry.prefix)
        assert [m.id for m in await view.machines()] == ["m1"]
        await registry.create_job(Job("a.service", "h1", "launched"))
        await registry.assign(Assignment("a.service", "m1", "h1", "launched"))
        await registry.store.put(registry.key("state", "a.service", "m1"), "{}")
        await registry.delete_job("a.service")
        # The copy follows the watch: the job came and went, the assignment stayed.
        await _until(lambda: registry.key("schedule", "m1", "a.service") in mirror.texts)
        await _until(lambda: registry.key("job", "a.service") not in mirror.texts)
        assert [a.unit for a in await view.assignments()] == ["a.service"]
        assert await view.jobs() == []
        # Skipped directories are not kept; nothing was listed again.
        assert not any("/state/" in key for key in mirror.texts)
        assert store.calls["list"] == 1 and mirror.lists == 1
    finally:
        task.cancel()


async def test_a_mirror_that_lost_its_history_lists_again_and_misses_nothing(registry):
    mirror = Mirror(registry.store, registry.prefix)
    await mirror.resync()
    await registry.create_job(Job("a.service", "h1", "launched"))
    await forget_history(registry)
    await registry.create_job(Job("b.service", "h1", "launched"))
    task = asyncio.create_task(mirror.run())
    try:
        view = Registry(MirrorStore(mirror), registry.prefix)
        await _until(lambda: mirror.lists == 2)
        await _until(lambda: registry.key("job", "b.service") in mirror.texts)
        assert [j.name for j in await view.jobs()] == ["a.service", "b.service"]
    finally:
        task.cancel()


async def test_a_write_through_the_mirror_store_is_read_back_at_once(registry):
    """Read-your-writes: what a client wrote is in the copy when its write returns."""
    mirror = Mirror(registry.store, registry.prefix)
    task = asyncio.create_task(mirror.run())
    try:
        await _until(lambda: mirror.synced)
        view = Registry(MirrorStore(mirror), registry.prefix)
        for i in range(5):
            await view.create_job(Job(f"u{i}.service", "h1", "launched"))
            assert f"u{i}.service" in [j.name for j in await view.jobs()]
            await view.set_desired_state(f"u{i}.service", "loaded")
            assert (await view.job(f"u{i}.service")).desired_state == "loaded"
            await view.assign(Assignment(f"u{i}.service", "m1", "h1", "loaded"))
            assert f"u{i}.service" in [a.unit for a in await view.assignments("m1")]
            await view.delete_job(f"u{i}.service")
            assert await view.job(f"u{i}.service") is None
        unit_file = UnitFile.parse("[Service]\nExecStart=/bin/true\n")
        await view.put_unit_file(unit_file)
        copy = MirrorStore(mirror)
        copy.inner = counted = CountingStore(copy.inner)
        found = await Registry(copy, registry.prefix).unit_files([unit_file.hash, "0" * 40])
        assert found[unit_file.hash] == unit_file and "missing" in found["0" * 40]
        assert not counted.calls  # read from the copy, not from etcd
    finally:
        task.cancel()


async def test_an_unreadable_record_in_the_mirror_is_skipped_with_a_reason(registry):
    mirror = Mirror(registry.store, registry.prefix)
    task = asyncio.create_task(mirror.run())
    try:
        await _until(lambda: mirror.synced)
        view = Registry(MirrorStore(mirror), registry.prefix)
        await view.store.put(registry.key("job", "bad.service"), "{not json")
        await view.create_job(Job("good.service", "h1", "launched"))
        assert [j.name for j in await view.jobs()] == ["good.service"]
        assert "job/bad.service cannot be read" in view.unreadable["job/bad.service"]
    finally:
        task.cancel()
