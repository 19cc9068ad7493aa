"""The stores through etcd outages on real etcd processes of their own: killed (SIGKILL) or
stopped (SIGSTOP) and back on the same port and data, or back with its data dir wiped or
restored from an older copy; and a reader behind etcd's history across a change that a later
write undid.

Losing etcd stops nothing: a store follows etcd on when it comes back with its data, and refuses
(DataReplaced, an outage to every caller) data that is not the data it followed, which a wiped
etcd would otherwise hand out as an empty schedule.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetpy.agent.agent import Agent
from fleetpy.lab.etcd import initial_cluster, start_cluster
from fleetpy.registry import Assignment, Machine, Registry
from fleetpy.registry.etcd2 import EtcdV2Store
from fleetpy.registry.etcd3 import EtcdV3Store
from fleetpy.registry.store import DataReplaced, Unavailable
from fleetpy.systemd import FakeSystemd
from fleetpy.unit import UnitFile

pytestmark = pytest.mark.integration

PREFIX = "/_fleetpy/"
SCHEDULE = PREFIX + "schedule/m1/"
SLEEP = "[Service]\nExecStart=/bin/sleep 100000\n"


class Etcd:
    """One etcd member of the test's own, to kill, stop, wipe and start again on its port."""

    def __init__(self, base: Path, api: str):
        self.base, self.api = base, api
        [self.member] = start_cluster(base, enable_v2=api == "v2")

    @property
    def url(self) -> str:
        return self.member.client_url

    def store(self, **options):
        kind = EtcdV2Store if self.api == "v2" else EtcdV3Store
        return kind([self.url], retry_for=8.0, request_timeout=2.0, **options)

    def kill(self) -> None:
        self.member.process.kill()
        self.member.process.wait()

    def start(self) -> None:
        self.member.start(initial_cluster([self.member]), log=self.base / "etcd.log")
        for _ in range(200):
            if self.member.healthy():
                return
            time.sleep(0.05)
        raise AssertionError(f"etcd did not come back; see {self.base}/etcd.log")

    def copy_data(self, to: Path) -> None:
        shutil.copytree(self.member.data_dir, to)

    def replace_data(self, source: Path | None) -> None:
        """With etcd down: its data dir wiped (None) or replaced by a copy."""
        shutil.rmtree(self.member.data_dir)
        if source is not None:
            shutil.copytree(source, self.member.data_dir)


@pytest.fixture(params=["v2", "v3"])
def etcd(request) -> Iterator[Etcd]:
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="fleetpy-outage-") as base:
        server = Etcd(Path(base), request.param)
        try:
            yield server
        finally:
            server.member.stop()


async def _wait_as_callers_do(store, index: int) -> int | None:
    """A wait on the schedule, watched again from the same index after an outage (DataReplaced
    is no outage to wait out here)."""
    while True:
        try:
            return await store.wait(SCHEDULE, index, timeout=30)
        except DataReplaced:
            raise
        except Unavailable:
            await asyncio.sleep(0.2)


async def _fill(store, count: int) -> None:
    for i in range(count):
        await store.put(SCHEDULE + f"u{i}.service", f'{{"n": {i}}}')


async def test_a_wiped_etcd_is_refused_not_read_as_an_empty_registry(etcd):
    store = etcd.store()
    await _fill(store, 5)
    assert len(await store.list(SCHEDULE)) == 5
    etcd.kill()
    etcd.replace_data(None)
    etcd.start()
    with pytest.raises(DataReplaced, match="went back"):
        await store.list(SCHEDULE)  # before: {}, and an agent stopped every unit
    assert isinstance(store.outage(), DataReplaced)
    # Written on past the index the store had seen, the new data is still not taken ...
    fresh = etcd.store()
    await _fill(fresh, 12)
    with pytest.raises(DataReplaced):
        await store.index(PREFIX)
    with pytest.raises(DataReplaced):
        await store.put(SCHEDULE + "late.service", "{}")
    # ... until fleetd starts again with a new store.
    assert len(await fresh.list(SCHEDULE)) == 12
    await store.close()
    await fresh.close()


async def test_an_etcd_restored_from_an_older_copy_is_refused(etcd, tmp_path):
    store = etcd.store()
    await _fill(store, 2)
    etcd.member.stop()
    etcd.copy_data(tmp_path / "copy")
    etcd.start()
    await _fill(store, 6)
    assert len(await store.list(SCHEDULE)) == 6
    etcd.kill()
    etcd.replace_data(tmp_path / "copy")
    etcd.start()
    with pytest.raises(DataReplaced, match="went back"):
        await store.list(SCHEDULE)  # before: the two units of the copy
    await store.close()


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
async def test_etcd_back_on_its_own_data_is_followed_on(etcd, fault):
    """The control: a plain outage is no replaced data, and a wait across it sees the next write."""
    store = etcd.store()
    await _fill(store, 3)
    index = await store.index(PREFIX)
    waiting = asyncio.ensure_future(_wait_as_callers_do(store, index))
    await asyncio.sleep(0.3)
    if fault == "SIGKILL":
        etcd.kill()
        await asyncio.sleep(1)
        etcd.start()
    else:
        os.kill(etcd.member.process.pid, signal.SIGSTOP)
        await asyncio.sleep(3)  # past the store's request timeout
        os.kill(etcd.member.process.pid, signal.SIGCONT)
    written = await store.put(SCHEDULE + "after.service", "{}")
    assert await asyncio.wait_for(waiting, 30) == written
    assert len(await store.list(SCHEDULE)) == 4
    assert store.outage() is None
    await store.close()


async def test_a_reader_behind_never_gets_a_change_that_a_later_write_undid(etcd):
    """As in the fault suite on v2: a machine cut off from etcd lost its unit's schedule entry
    and got it back when it returned; its agent, reading etcd's history one change per request,
    acted on the deletion, and etcd went down before the next request."""
    store = etcd.store()
    key = SCHEDULE + "web@3.service"
    await store.put(key, '{"hash": "a"}')
    index = await store.index(PREFIX)
    await store.delete(key)
    await store.put(key, '{"hash": "a"}')
    await store.put(PREFIX + "machines/m2", "{}")  # etcd moves on elsewhere
    copy = {key: '{"hash": "a"}'}
    for change in await store.changes(SCHEDULE, index, timeout=5):
        copy[change.key] = change.value
    assert copy[key] == await store.get(key)
    await store.close()


async def test_an_agent_stops_nothing_when_etcd_comes_back_wiped(etcd):
    """What fleetd does with a wiped etcd: its agent keeps every unit running (real etcd, a fake
    systemd)."""
    registry = Registry(etcd.store(), PREFIX)
    systemd = FakeSystemd()
    agent = Agent(registry, systemd, Machine("m1", "127.0.0.1"), ttl=3)
    task = asyncio.ensure_future(agent.run())
    try:
        digest = await registry.put_unit_file(UnitFile.parse(SLEEP))
        await registry.assign(Assignment("a.service", "m1", digest, "launched"))
        for _ in range(100):
            if (await systemd.unit_state("a.service"))[1] == "active":
                break
            await asyncio.sleep(0.05)
        assert (await systemd.unit_state("a.service"))[1] == "active"
        etcd.kill()
        etcd.replace_data(None)
        etcd.start()
        await asyncio.sleep(6)  # two heartbeats, and the agent's passes after its watch failed
        assert (await systemd.unit_state("a.service"))[1] == "active"
        assert isinstance(registry.store.outage(), DataReplaced)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await registry.close()
