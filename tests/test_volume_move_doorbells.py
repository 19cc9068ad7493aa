"""Each agent learns of the volume moves it takes part in from its own doorbells,
volume-moves/<machine>/<name>, rung with every step of the move: a move between A and B wakes no
agent of a third machine C (counted on real etcd, v2 and v3). The store writes a step and its
doorbells at once (v3, memory) or the doorbells right after (v2); a machine left untold (a v2
writer stopped in between, or a move begun before doorbells existed) is told by the engine
leader after RING_AFTER, and the move goes on. tests/test_volume_moves.py has the steps."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from fleetpy.agent.agent import Agent
from fleetpy.agent.moves import VolumeMoves, over, pack
from fleetpy.engine.engine import Engine
from fleetpy.events import AgentEvents
from fleetpy.registry import (
    MOVE_COPYING,
    MOVE_DONE,
    MOVE_FAILED,
    MOVE_STOPPING,
    Machine,
    Registry,
    Unavailable,
    VolumeMove,
    VolumeRecord,
    moves,
)
from fleetpy.registry.etcd2 import EtcdV2Store
from fleetpy.registry.memory import ManualClock
from fleetpy.systemd import FakeSystemd
from tests.conftest import open_backend

A = "1a2b" + "0" * 28
B = "2b3c" + "0" * 28
C = "3c4d" + "0" * 28


def moving(state: str = MOVE_STOPPING, target: str = B, started: float = 100.0) -> VolumeRecord:
    return VolumeRecord(A, VolumeMove(A, target, state, started))


# --- pure decisions ------------------------------------------------------------------------------


def test_a_machine_is_untold_while_its_doorbell_does_not_hold_the_record_of_a_move_under_way() -> None:
    record = moving(MOVE_COPYING)
    told = record.to_text()
    earlier = moving(MOVE_STOPPING).to_text()
    assert moves.concerned(record) == [A, B] and moves.concerned(VolumeRecord(A)) == []
    assert moves.untold({"data": record}, {(A, "data"): told, (B, "data"): told}, [A, B, C]) == []
    assert moves.untold({"data": record}, {(A, "data"): told, (B, "data"): earlier}, [A, B]) == [
        moves.Untold(B, "data", told, earlier)
    ]
    # A move begun before doorbells existed: neither machine was told.
    assert [u.machine_id for u in moves.untold({"data": record}, {}, [A, B])] == [A, B]
    # A machine that is gone is not rung (the engine fails its move instead), nor is C ever.
    assert [u.machine_id for u in moves.untold({"data": record}, {}, [A, C])] == [A]
    # A doorbell that cannot be read is rung over.
    assert moves.untold({"data": record}, {(A, "data"): "{x", (B, "data"): told}, [A, B])[0].seen == "{x"


def test_after_a_move_ended_only_a_doorbell_left_at_an_earlier_step_is_untold() -> None:
    done = VolumeRecord(B, VolumeMove(A, B, MOVE_DONE, 100.0, 105.0))
    copying = moving(MOVE_COPYING).to_text()
    # Both answered theirs: their parts are over.
    assert moves.untold({"data": done}, {}, [A, B]) == []
    # A v2 target stopped between writing "done" and the doorbells: A would keep its old copy.
    assert moves.untold({"data": done}, {(A, "data"): copying}, [A, B]) == [
        moves.Untold(A, "data", done.to_text(), copying)
    ]
    assert moves.untold({"data": VolumeRecord(A)}, {}, [A, B]) == []


def test_a_machine_answers_its_doorbell_once_nothing_of_the_move_is_left_for_it() -> None:
    assert not over(moving(MOVE_STOPPING), A, pulling=False, here=True)
    assert not over(moving(MOVE_STOPPING), B, pulling=False, here=False)
    assert not over(moving(MOVE_COPYING), B, pulling=True, here=False)
    done = VolumeRecord(B, VolumeMove(A, B, MOVE_DONE, 100.0, 105.0))
    assert not over(done, A, pulling=False, here=True)  # its old copy is still to be set aside
    assert over(done, A, pulling=False, here=False) and over(done, B, pulling=False, here=True)
    failed = VolumeRecord(A, VolumeMove(A, B, MOVE_FAILED, 100.0, 105.0, "x"))
    assert not over(failed, B, pulling=True, here=False)  # its pull ends by itself, then it answers
    assert over(failed, B, pulling=False, here=False) and over(failed, A, pulling=False, here=True)
    # The volume was forgotten, or a newer move concerns other machines.
    assert over(None, B, pulling=False, here=False)
    assert over(moving(MOVE_STOPPING, target=C, started=200.0), B, pulling=False, here=False)


# --- the store and the registry, on every backend -----------------------------------------------


async def test_each_step_rings_the_source_and_the_target_and_each_answers_only_its_own(
    any_registry: Registry,
) -> None:
    registry = any_registry
    await registry.claim_volume("data", A)
    assert await registry.all_volume_doorbells() == {}  # a volume that never moved rings nobody
    started = await registry.update_volume("data", moves.start("data", B, 100.0))
    assert started is not None and started.moving is not None
    text = started.to_text()
    assert await registry.all_volume_doorbells() == {(A, "data"): text, (B, "data"): text}
    assert await registry.volume_doorbells(C) == {}
    copying = await registry.update_volume("data", moves.serving(started.moving))
    assert copying is not None
    assert await registry.volume_doorbells(B) == {"data": copying.to_text()}
    # An answer to a step since rung over removes nothing; an answer to the latest does.
    assert not await registry.answer_volume_doorbell(B, "data", text)
    assert await registry.answer_volume_doorbell(B, "data", copying.to_text())
    assert await registry.all_volume_doorbells() == {(A, "data"): copying.to_text()}
    # The engine's ring is a compare-and-swap on the doorbell as it saw it.
    assert not await registry.ring_volume_doorbell(A, "data", copying.to_text(), None)
    assert await registry.ring_volume_doorbell(B, "data", copying.to_text(), None)
    assert await registry.volume_records_of(["data", "nope"]) == {"data": copying, "nope": None}
    await registry.forget_volume_doorbells(A)
    assert await registry.all_volume_doorbells() == {(B, "data"): copying.to_text()}


async def test_on_etcd_v2_a_step_whose_doorbells_fail_stands_and_leaves_its_machines_untold(
    etcd_url: str, etcd_prefix: str
) -> None:
    class DoorbellsFail(EtcdV2Store):
        async def apply(self, ops):  # type: ignore[no-untyped-def]
            raise Unavailable("etcd went away after the compare-and-swap")

    registry = Registry(DoorbellsFail([etcd_url]), etcd_prefix)
    try:
        await registry.claim_volume("data", A)
        started = await registry.update_volume("data", moves.start("data", B, 100.0))
        assert started == moving() and await registry.volume_record("data") == moving()
        assert await registry.all_volume_doorbells() == {}
        records = {"data": moving()}
        assert [u.machine_id for u in moves.untold(records, {}, [A, B])] == [A, B]
    finally:
        await registry.close()


# --- whole moves ---------------------------------------------------------------------------------


class PackingSource:
    """A VolumeSource packing a directory on this disk, as the source's fleetd would serve it."""

    def __init__(self, volume: Path):
        self.volume = volume

    async def fetch_volume(self, machine_id: str, name: str, sink) -> None:  # type: ignore[no-untyped-def]
        pack(self.volume, sink)


async def _idle(name: str) -> bool:
    return True


def _volume(root: Path) -> Path:
    volume = root / "data"
    volume.mkdir(parents=True)
    (volume / "records").write_text("one\ntwo\n")
    return volume


async def _until(what: str, condition, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(0.02)


class WatchCounter:
    """A registry store that counts what its watches deliver: each wait or changes call that
    comes back with a change is a wake-up of its caller, by the prefix it watched."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner = inner
        self.watched: set[str] = set()
        self.wakes: Counter[str] = Counter()

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)

    async def wait(self, prefix: str, after_index: int, timeout: float) -> int | None:
        self.watched.add(prefix)
        found = await self.inner.wait(prefix, after_index, timeout)
        if found is not None:
            self.wakes[prefix] += 1
        return found

    async def changes(self, prefix: str, after_index: int, timeout: float):  # type: ignore[no-untyped-def]
        self.watched.add(prefix)
        found = await self.inner.changes(prefix, after_index, timeout)
        if found:
            self.wakes[prefix] += 1
        return found


@pytest.mark.parametrize("backend", ["v2", "v3"])
async def test_a_move_between_a_and_b_wakes_no_agent_of_a_third_machine(
    backend: str, request, etcd_prefix: str, tmp_path: Path
) -> None:
    # Three machines, each with its own connection to the same real etcd: A and B follow their
    # volume moves, C runs a whole agent (schedule, heartbeat, moves), and its store counts
    # every wake-up its watches deliver. A's is counted too: the counter sees wake-ups.
    a_store = WatchCounter((await open_backend(request, backend, etcd_prefix)).store)
    registries = {
        A: Registry(a_store, etcd_prefix),
        B: await open_backend(request, backend, etcd_prefix),
    }
    c_store = WatchCounter((await open_backend(request, backend, etcd_prefix)).store)
    c_registry = Registry(c_store, etcd_prefix)
    source = _volume(tmp_path / "a")
    c_agent = Agent(c_registry, FakeSystemd(), Machine(C), ttl=30, volume_dir=tmp_path / "c")
    followers = [
        VolumeMoves(registries[A], A, tmp_path / "a", _idle, None, AgentEvents()),
        VolumeMoves(registries[B], B, tmp_path / "b", _idle, PackingSource(source), AgentEvents()),
    ]
    tasks = [asyncio.create_task(f.run()) for f in followers] + [asyncio.create_task(c_agent.run())]
    api = registries[A]
    try:
        await api.claim_volume("data", A)
        await asyncio.wait_for(c_agent.reconciled.wait(), 10)
        await asyncio.sleep(0.5)  # every watch of C's agent is open
        c_store.wakes.clear()
        await api.update_volume("data", moves.start("data", B, 100.0))
        await _until("the volume on B", lambda: _lives_on(api, B))
        await _until("A's copy set aside", lambda: _async(not (tmp_path / "a" / "data").exists()))
        await asyncio.sleep(0.5)  # a late wake-up of C would have come by now
        assert sum(c_store.wakes.values()) == 0, f"C's agent woke up: {dict(c_store.wakes)}"
        assert not any(p.endswith("/volumes") for p in c_store.watched), c_store.watched
        assert a_store.wakes, "A's agent was never woken: the counter counts nothing"
        assert (tmp_path / "b" / "data" / "records").read_text() == "one\ntwo\n"
        # Both parts over: the doorbells are gone again.
        await _until("the doorbells answered", lambda: _async_of(api.all_volume_doorbells(), {}))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for registry in (*registries.values(), c_registry):
            await registry.close()


async def _lives_on(registry: Registry, machine_id: str) -> bool:
    record = await registry.volume_record("data")
    return record is not None and record.machine_id == machine_id


async def _async(value: bool) -> bool:
    return value


async def _async_of(coroutine, wanted) -> bool:  # type: ignore[no-untyped-def]
    return await coroutine == wanted


async def test_a_move_begun_without_doorbells_is_rung_by_the_engine_and_finishes(
    any_registry: Registry, tmp_path: Path
) -> None:
    # What a fleetd from before doorbells left: a move under way on volumes/<name> alone (or a
    # v2 writer stopped between its step and the doorbells). Nobody is woken by it.
    registry = any_registry
    await registry.claim_volume("data", A)
    await registry.store.put(registry.key("volumes", "data"), moving().to_text(), prev_value=A)
    for machine_id in (A, B):
        await registry.register_machine(Machine(machine_id), ttl=600)
    source = _volume(tmp_path / "a")
    followers = [
        VolumeMoves(registry, A, tmp_path / "a", _idle, None, AgentEvents()),
        VolumeMoves(registry, B, tmp_path / "b", _idle, PackingSource(source), AgentEvents()),
    ]
    tasks = [asyncio.create_task(f.run()) for f in followers]
    clock = ManualClock()
    engine = Engine(registry, C, lease_ttl=10, clock=clock)
    engine._leading_since = clock() - 60
    try:
        await asyncio.sleep(0.3)
        assert await registry.volume_record("data") == moving()  # stuck: nobody was told
        await engine.reconcile()
        assert await registry.all_volume_doorbells() == {}  # not yet: a v2 writer may be ringing
        assert engine._next_pass() <= moves.RING_AFTER
        clock.advance(moves.RING_AFTER)
        await engine.reconcile()
        await _until("the volume on B", lambda: _lives_on(registry, B))
        assert (tmp_path / "b" / "data" / "records").read_text() == "one\ntwo\n"
        await _until("the doorbells answered", lambda: _async_of(registry.all_volume_doorbells(), {}))
        await engine.reconcile()
        assert engine._untold == {}
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_source_restarted_after_the_move_sets_its_copy_aside_and_answers(
    any_registry: Registry, tmp_path: Path
) -> None:
    registry = any_registry
    _volume(tmp_path)
    await registry.claim_volume("data", A)
    await registry.update_volume("data", lambda r: moving(MOVE_COPYING))
    # The target wrote "done" while A's fleetd was down.
    await registry.update_volume("data", moves.arrived(moving(MOVE_COPYING).move, 105.0, 8))
    await registry.answer_volume_doorbell(B, "data", (await registry.volume_doorbells(B))["data"])
    task = asyncio.create_task(VolumeMoves(registry, A, tmp_path, _idle, None, AgentEvents()).run())
    try:
        await _until("the doorbell answered", lambda: _async_of(registry.all_volume_doorbells(), {}))
        assert not (tmp_path / "data").exists()
        assert [p.name for p in tmp_path.iterdir()] == ["data~moved-105"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
