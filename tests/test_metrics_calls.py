"""etcd's time per fleetd activity: every etcd request is labelled with the registry call it serves."""

from __future__ import annotations

import asyncio

import pytest

from fleetpy.conf import metrics
from fleetpy.registry import Assignment, Machine, MemoryStore, Registry, UnitState
from fleetpy.registry.measured import MeasuredStore
from fleetpy.registry.mirror import Mirror, MirrorStore
from fleetpy.registry.store import Unavailable


def counts() -> dict[tuple[str, ...], int]:
    return {labels: value.count for labels, value in metrics.ETCD_SECONDS.values.items()}


def added(before: dict[tuple[str, ...], int]) -> dict[tuple[str, ...], int]:
    return {k: n - before.get(k, 0) for k, n in counts().items() if n != before.get(k, 0)}


@pytest.fixture
def registry() -> Registry:
    return Registry(MeasuredStore(MemoryStore()))


async def test_each_request_is_labelled_with_the_registry_method_that_made_it(registry):
    await registry.register_machine(Machine("m1"), ttl=10)
    before = counts()
    await registry.refresh_machine("m1", ttl=10)
    await asyncio.gather(registry.machines(), registry.jobs())
    assert added(before) == {
        ("refresh_machine", "refresh"): 1,
        ("machines", "list"): 3,  # records, metadata edits, cordons
        ("jobs", "list"): 1,
    }


async def test_batches_are_labelled_by_what_they_write_even_inside_another_call(registry):
    state = UnitState("a.service", "m1", "h", "loaded", "active", "running")
    before = counts()
    await registry.apply(
        registry.batch().assign(Assignment("a.service", "m1", "h", "launched")).set_pending("b.service", "x")
    )
    await registry.apply(registry.batch().publish_state(state))
    await registry.publish_state(state)  # a registry method made of a batch: named by the batch
    assert added(before) == {("write_schedule", "apply"): 1, ("write_states", "apply"): 2}


async def test_a_store_used_outside_the_registry_is_labelled_other_and_errors_count_by_call():
    class Away(MemoryStore):
        async def list(self, prefix: str) -> dict[str, str]:
            raise Unavailable("etcd is unreachable")

    registry = Registry(MeasuredStore(Away()))
    errors_before = metrics.ETCD_ERRORS.values.get(("jobs", "list"), 0)
    before = counts()
    await registry.store.get("/x")
    with pytest.raises(Unavailable):
        await registry.jobs()
    assert added(before) == {("other", "get"): 1, ("jobs", "list"): 1}
    assert metrics.ETCD_ERRORS.values[("jobs", "list")] == errors_before + 1


async def test_the_call_label_takes_only_the_registry_methods_names(registry):
    """Bounded cardinality: one value per method of the registry, plus batches and `other`."""
    await registry.ensure_schema()
    await registry.register_machine(Machine("m1"), ttl=10)
    await registry.assign(Assignment("a.service", "m1", "h", "launched"))
    await asyncio.gather(registry.events(), registry.leader(), registry.assignments("m1"))
    methods = {name for name in vars(Registry) if not name.startswith("_")}
    assert {"refresh_machine", "machines", "put_events", "submit"} <= methods
    seen = {call for call, _operation in metrics.ETCD_SECONDS.values}
    assert {"ensure_schema", "register_machine", "write_schedule", "events", "leader"} <= seen
    assert seen <= methods | {
        "write_schedule",
        "write_states",
        "write_schedule+write_states",
        "mirror",
        "other",
    }


async def test_the_watch_fed_copy_names_its_own_requests_whoever_started_it():
    store = MeasuredStore(MemoryStore())
    writer = Registry(store)
    mirror = Mirror(store, writer.prefix)
    reads = Registry(MirrorStore(mirror, start=True), writer.prefix)
    before = counts()
    await reads.jobs()  # the first read starts the copy, from inside the `jobs` call
    for _ in range(1000):
        if mirror.synced:
            break
        await asyncio.sleep(0)
    await reads.register_machine(Machine("m1"), ttl=10)  # returns once the copy holds it
    assert [m.id for m in await reads.machines()] == ["m1"]  # from the copy
    await mirror.close()
    made = added(before)
    assert made[("mirror", "list")] == 1 and made[("mirror", "index")] == 1
    assert made[("jobs", "list")] == 1  # before the copy had listed, the read went to etcd
    assert not any(operation == "changes" for _call, operation in made)  # long polls are not timed
