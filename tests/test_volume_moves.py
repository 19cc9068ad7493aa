"""Moving a local volume, as pure decisions and on a temporary disk: the record's steps (who may
write what, and a step that lost a race doing nothing), the engine holding the units while the
volume moves, the agent's next step, and the tar stream (packed without following links,
unpacked with every member checked). tests/test_volume_moves_api.py runs whole moves through
the API and two fleetds; tests/test_volumes_lab.py on a real lab."""

from __future__ import annotations

import asyncio
import io
import os
import tarfile
from pathlib import Path

import pytest

from fleetpy.agent.moves import (
    DATA,
    END,
    PULL,
    SERVE,
    SET_ASIDE,
    MoveError,
    VolumeMoves,
    next_step,
    pack,
    refusal,
    set_aside,
    stream,
    unpack,
)
from fleetpy.engine.scheduler import plan
from fleetpy.events import AgentEvents
from fleetpy.registry import (
    MOVE_COPYING,
    MOVE_DONE,
    MOVE_FAILED,
    MOVE_STOPPING,
    Assignment,
    Job,
    Machine,
    MemoryStore,
    Registry,
    VolumeMove,
    VolumeRecord,
    memory_registry,
    moves,
)
from fleetpy.unit import load_unit

A = "1a2b" + "0" * 28
B = "2b3c" + "0" * 28
C = "3c4d" + "0" * 28
DB = "[Service]\nExecStart=/bin/sleep infinity\n[X-Fleet]\nVolume=data\n"


def moving(state: str = MOVE_STOPPING) -> VolumeRecord:
    return VolumeRecord(A, VolumeMove(A, B, state, 100.0))


# --- the record and its steps ------------------------------------------------------------------


def test_a_record_without_a_move_is_the_bare_machine_id_older_fleetds_wrote() -> None:
    assert VolumeRecord(A).to_text() == A
    assert VolumeRecord.from_text(A) == VolumeRecord(A)
    record = VolumeRecord(B, VolumeMove(A, B, MOVE_DONE, 100.0, 103.5, size=42))
    assert VolumeRecord.from_text(record.to_text()) == record
    assert record.moving is None and moving().moving is not None


def test_a_record_with_an_unknown_move_state_cannot_be_read() -> None:
    with pytest.raises(ValueError, match="unknown move state"):
        VolumeRecord.from_text(
            '{"machineID": "a", "move": {"source": "a", "target": "b", "state": "x", "started": 1}}'
        )


def test_a_move_starts_stopping_and_a_move_to_its_own_machine_changes_nothing() -> None:
    assert moves.start("data", B, 100.0)(VolumeRecord(A)) == moving()
    assert moves.start("data", A, 100.0)(VolumeRecord(A)) is None
    with pytest.raises(moves.MoveRefused, match="volume data not found") as refused:
        moves.start("data", B, 100.0)(None)
    assert refused.value.kind == "not-found"
    with pytest.raises(
        moves.MoveRefused, match=r"already moving from 1a2b0000\.\.\. to 2b3c0000\.\.\."
    ) as busy:
        moves.start("data", C, 101.0)(moving(MOVE_COPYING))
    assert busy.value.kind == "busy"
    # After a move ended, the next one may start.
    failed = VolumeRecord(A, VolumeMove(A, B, MOVE_FAILED, 100.0, reason="x"))
    assert moves.start("data", B, 200.0)(failed) == VolumeRecord(A, VolumeMove(A, B, MOVE_STOPPING, 200.0))


def test_each_step_applies_only_to_the_move_it_saw_in_the_state_it_follows() -> None:
    seen = moving().move
    assert moves.serving(seen)(moving()) == moving(MOVE_COPYING)
    assert moves.serving(seen)(moving(MOVE_COPYING)) is None  # done already
    copying = moving(MOVE_COPYING).move
    arrived = moves.arrived(copying, 103.0, 7)(moving(MOVE_COPYING))
    assert arrived == VolumeRecord(B, VolumeMove(A, B, MOVE_DONE, 100.0, 103.0, size=7))
    # The engine failed it meanwhile: the target's late "arrived" writes nothing.
    failed = moves.failed(copying, "target machine gone", 102.0)(moving(MOVE_COPYING))
    assert failed == VolumeRecord(A, VolumeMove(A, B, MOVE_FAILED, 100.0, 102.0, "target machine gone"))
    assert moves.arrived(copying, 103.0, 7)(failed) is None
    # A newer move of the same volume is not touched by steps of an older one.
    newer = VolumeRecord(A, VolumeMove(A, C, MOVE_STOPPING, 200.0))
    assert moves.serving(seen)(newer) is None and moves.failed(seen, "x", 1.0)(newer) is None
    assert moves.failed(seen, "x", 1.0)(None) is None


def test_moves_whose_source_or_target_is_gone_are_stranded() -> None:
    records = {
        "to-gone": VolumeRecord(A, VolumeMove(A, C, MOVE_COPYING, 1.0)),
        "from-gone": VolumeRecord(C, VolumeMove(C, B, MOVE_STOPPING, 1.0)),
        "fine": moving(),
        "ended": VolumeRecord(A, VolumeMove(A, C, MOVE_FAILED, 1.0)),
    }
    stranded = moves.stranded(records, [A, B])
    assert {n: why for n, (_, why) in stranded.items()} == {
        "to-gone": "target machine 3c4d0000... is gone",
        "from-gone": "source machine 3c4d0000... is gone",
    }


class _Racing(MemoryStore):
    """A store where another party writes `value` just before our first compare-and-swap."""

    def __init__(self, value: str):
        super().__init__()
        self.value: str | None = value

    async def compare_and_put(self, key, value, prev_value, also=()):  # type: ignore[no-untyped-def]
        if prev_value is not None and self.value is not None:
            other, self.value = self.value, None
            await super().put(key, other)
        return await super().compare_and_put(key, value, prev_value, also)


async def test_update_volume_compares_and_swaps_and_decides_again_when_another_wrote_first() -> None:
    registry = Registry(_Racing(moving(MOVE_COPYING).to_text()))
    assert await registry.claim_volume("data", A) == A
    # Our start loses to a move that got there first: deciding again, it refuses.
    with pytest.raises(moves.MoveRefused, match="already moving"):
        await registry.update_volume("data", moves.start("data", C, 100.0))
    assert await registry.volume_record("data") == moving(MOVE_COPYING)
    assert await registry.volumes() == {"data": A}
    assert await registry.claim_volume("data", B) == A  # the JSON record still names its machine
    assert await registry.update_volume(
        "data", moves.arrived(moving(MOVE_COPYING).move, 2.0, 1)
    ) == VolumeRecord(B, VolumeMove(A, B, MOVE_DONE, 100.0, 2.0, size=1))


# --- the engine holds the units ------------------------------------------------------------------


def test_a_unit_whose_volume_moves_runs_nowhere_with_the_reason() -> None:
    unit = load_unit("db.service", DB)
    jobs = [(Job("db.service", unit.hash, "launched"), unit)]
    machines = [Machine(A), Machine(B)]
    current = [Assignment("db.service", A, unit.hash, "launched")]
    held = plan(machines, jobs, current, volumes={"data": A}, moving={"data": (A, B)})
    assert held.assignments == ()
    assert str(held.pending["db.service"]) == "volume data is moving from 1a2b0000... to 2b3c0000..."
    after = plan(machines, jobs, [], volumes={"data": B})
    assert [a.machine_id for a in after.assignments] == [B]


# --- the agent's next step -----------------------------------------------------------------------


def test_the_source_serves_once_idle_the_target_pulls_once_and_the_source_sets_its_copy_aside() -> None:
    assert next_step(moving(), A, idle=False, pulling=False, here=True) is None
    assert next_step(moving(), A, idle=True, pulling=False, here=True) == SERVE
    assert next_step(moving(), B, idle=True, pulling=False, here=False) is None
    assert next_step(moving(MOVE_COPYING), B, idle=True, pulling=False, here=False) == PULL
    assert next_step(moving(MOVE_COPYING), B, idle=True, pulling=True, here=False) is None
    assert next_step(moving(MOVE_COPYING), A, idle=True, pulling=False, here=True) is None
    done = VolumeRecord(B, VolumeMove(A, B, MOVE_DONE, 1.0, 2.0))
    assert next_step(done, A, idle=True, pulling=False, here=True) == SET_ASIDE
    assert next_step(done, A, idle=True, pulling=False, here=False) is None
    assert next_step(done, B, idle=True, pulling=False, here=True) is None
    # Moved back to A later: A's copy is the volume again, never set aside.
    back = VolumeRecord(A, VolumeMove(A, B, MOVE_DONE, 1.0, 2.0))
    assert next_step(back, A, idle=True, pulling=False, here=True) is None
    assert next_step(VolumeRecord(A), A, idle=True, pulling=False, here=True) is None


def test_setting_aside_renames_and_never_deletes(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "f").write_text("x")
    aside = set_aside(tmp_path, "data", "moved", 1700000000.5)
    assert aside == tmp_path / "data~moved-1700000000" and (aside / "f").read_text() == "x"
    assert set_aside(tmp_path, "data", "moved", 1.0) is None


# --- the stream ----------------------------------------------------------------------------------


def _volume(root: Path) -> Path:
    volume = root / "data"
    (volume / "sub" / ".hidden").mkdir(parents=True)
    (volume / "records").write_text("one\ntwo\n")
    (volume / "sub" / ".hidden" / "deep").write_bytes(os.urandom(200_000))
    os.chmod(volume / "records", 0o640)
    os.symlink("records", volume / "latest")
    os.symlink("/etc/passwd", volume / "outside")  # kept as a link on the source, never followed
    os.mkfifo(volume / "pipe")
    os.link(volume / "records", volume / "hardlink")
    return volume


def test_a_volume_goes_through_the_stream_whole_with_modes_and_inner_links(tmp_path: Path) -> None:
    volume = _volume(tmp_path / "src")
    out = io.BytesIO()
    size = pack(volume, out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        names = [m.name for m in tar]
    assert names[0] == DATA and names[-1] == END and f"{DATA}/pipe" not in names
    assert f"{DATA}/sub/.hidden/deep" in names
    assert size == 2 * len("one\ntwo\n") + 200_000  # the hard link is sent as a second file
    # The source's link out of the volume is refused on the way in: the copy fails, whole or not.
    with pytest.raises(MoveError, match="a symlink out of the volume"):
        unpack(io.BytesIO(out.getvalue()), _empty(tmp_path / "dst1"))
    os.unlink(volume / "outside")
    out = io.BytesIO()
    pack(volume, out)
    into = _empty(tmp_path / "dst2")
    assert unpack(io.BytesIO(out.getvalue()), into) == size
    copy = into / DATA
    assert (copy / "records").read_text() == "one\ntwo\n"
    assert (copy / "hardlink").read_text() == "one\ntwo\n"
    assert os.readlink(copy / "latest") == "records"
    assert (copy / "sub" / ".hidden" / "deep").read_bytes() == (
        volume / "sub" / ".hidden" / "deep"
    ).read_bytes()
    assert oct(os.stat(copy / "records").st_mode & 0o777) == oct(0o640)


def _empty(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _tar(*members: tuple[tarfile.TarInfo, bytes], end: bool = True) -> io.BytesIO:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for member, data in members:
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        if end:
            tar.addfile(tarfile.TarInfo(END))
    out.seek(0)
    return out


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type, member.linkname = kind, link
    return member


@pytest.mark.parametrize(
    ("member", "why"),
    [
        (_member("/etc/cron.d/x"), "an absolute path"),
        (_member("data/../../x"), "a path that leaves the volume"),
        (_member("other/x"), "not under data/"),
        (_member("data/l", tarfile.SYMTYPE, "/etc/shadow"), "a symlink out of the volume"),
        (_member("data/l", tarfile.SYMTYPE, "../../etc"), "a symlink out of the volume"),
        (_member("data", tarfile.SYMTYPE, "data"), "the volume itself as a symlink"),
        (_member("data/h", tarfile.LNKTYPE, "data/x"), "a hard link"),
        (_member("data/dev", tarfile.CHRTYPE), "a device file"),
        (_member("data/fifo", tarfile.FIFOTYPE), "a device file"),
    ],
)
def test_members_that_could_leave_or_harm_the_volume_are_refused(member: tarfile.TarInfo, why: str) -> None:
    assert why in (refusal(member) or "")


def test_a_chain_of_inner_symlinks_that_leads_out_is_refused_on_the_disk(tmp_path: Path) -> None:
    # Each link reads as inside the volume; resolved on the disk, the last one leaves it.
    stream_ = _tar(
        (_member("data", tarfile.DIRTYPE), b""),
        (_member("data/s", tarfile.SYMTYPE, "."), b""),
        (_member("data/t", tarfile.SYMTYPE, "s/s/s/.."), b""),
    )
    assert refusal(_member("data/t", tarfile.SYMTYPE, "s/s/s/..")) is None
    with pytest.raises(MoveError, match="data/t.*symlink out of the volume"):
        unpack(stream_, _empty(tmp_path / "in"))
    assert not (tmp_path / "in" / "data" / "t").exists()


def test_a_stream_cut_short_or_with_a_bad_member_is_refused_and_writes_nothing_outside(
    tmp_path: Path,
) -> None:
    into = _empty(tmp_path / "in")
    with pytest.raises(MoveError, match="ended before the end"):
        unpack(_tar((_member("data", tarfile.DIRTYPE), b""), (_member("data/x"), b"x"), end=False), into)
    with pytest.raises(MoveError, match="refused member '../x'"):
        unpack(_tar((_member("../x"), b"evil")), _empty(tmp_path / "in2"))
    assert not (tmp_path / "x").exists()
    with pytest.raises(MoveError, match="not a whole volume"):
        unpack(io.BytesIO(b"not a tar at all" * 100), _empty(tmp_path / "in3"))


async def test_the_stream_is_packed_in_a_thread_and_stops_when_the_reader_goes(tmp_path: Path) -> None:
    volume = _volume(tmp_path)
    os.unlink(volume / "outside")
    received = bytearray()

    async def write(chunk: bytes) -> None:
        received.extend(chunk)

    size = await stream(volume, write)
    assert unpack(io.BytesIO(bytes(received)), _empty(tmp_path / "in")) == size

    async def broken(chunk: bytes) -> None:
        raise ConnectionResetError("reader gone")

    with pytest.raises(ConnectionResetError):
        await stream(volume, broken)


# --- a fleetd that restarts half-way ------------------------------------------------------------


class PackingSource:
    """A VolumeSource that packs a directory on this disk, as the source's fleetd would serve it."""

    def __init__(self, volume: Path):
        self.volume = volume
        self.fetched: list[tuple[str, str]] = []

    async def fetch_volume(self, machine_id: str, name: str, sink) -> None:  # type: ignore[no-untyped-def]
        self.fetched.append((machine_id, name))
        pack(self.volume, sink)


async def _run_until(moves_: VolumeMoves, registry: Registry, done) -> VolumeRecord:  # type: ignore[no-untyped-def]
    task = asyncio.create_task(moves_.run())
    try:
        async with asyncio.timeout(10):
            while not done(record := await registry.volume_record("data")):
                await asyncio.sleep(0.002)
        return record
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_target_restarted_mid_copy_starts_over_from_the_record_and_finishes(tmp_path: Path) -> None:
    source = _volume(tmp_path / "a")
    os.unlink(source / "outside")
    registry = memory_registry()
    await registry.claim_volume("data", A)
    await registry.update_volume("data", lambda r: moving(MOVE_COPYING))
    # What the previous fleetd left when it died: half a spool, half an unpacked tree.
    root = tmp_path / "b"
    (root / "data~incoming" / "data").mkdir(parents=True)
    (root / "data~incoming" / "data" / "records").write_text("one\n")
    (root / "data~incoming.tar").write_bytes(b"half a tar")
    fetcher = PackingSource(source)
    target = VolumeMoves(registry, B, root, _idle, fetcher, AgentEvents())
    record = await _run_until(target, registry, lambda r: r.move.state == MOVE_DONE)
    assert record.machine_id == B and fetcher.fetched == [(A, "data")]
    assert (root / "data" / "records").read_text() == "one\ntwo\n"
    assert sorted(p.name for p in root.iterdir()) == ["data"]


async def test_a_source_restarted_while_stopping_serves_once_its_units_are_gone(tmp_path: Path) -> None:
    registry = memory_registry()
    await registry.claim_volume("data", A)
    await registry.update_volume("data", lambda r: moving(MOVE_STOPPING))
    busy = True

    async def idle(name: str) -> bool:
        return not busy

    source = VolumeMoves(registry, A, tmp_path, idle, None, AgentEvents())
    task = asyncio.create_task(source.run())
    try:
        await asyncio.sleep(0.05)
        assert (await registry.volume_record("data")).move.state == MOVE_STOPPING  # a unit still runs
        busy = False
        source.wanted.set()  # as the agent does after the pass that stopped it
        async with asyncio.timeout(10):
            while (await registry.volume_record("data")).move.state != MOVE_COPYING:
                await asyncio.sleep(0.002)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _idle(name: str) -> bool:
    return True


async def test_a_target_pulls_on_the_watch_alone_while_its_agent_keeps_interrupting_it(
    tmp_path: Path, v3_registry
) -> None:
    # The agent's word (after each of its passes) cancels the target's wait on volumes/, often
    # while etcd is still creating its watch: the move must go on from the watch's event alone
    # (no re-read on a timer). Before the store created watches under its own ids, such a
    # cancelled creation could hand its watch to the next one and the target slept through.
    source = _volume(tmp_path / "a")
    os.unlink(source / "outside")
    registry = v3_registry
    await registry.claim_volume("data", A)
    await registry.update_volume("data", lambda r: moving(MOVE_STOPPING))
    target = VolumeMoves(registry, B, tmp_path / "b", _idle, PackingSource(source), AgentEvents())
    task = asyncio.create_task(target.run())

    async def agent_passes() -> None:
        while True:
            target.wanted.set()
            await asyncio.sleep(0)

    passes = asyncio.create_task(agent_passes())
    try:
        await asyncio.sleep(0.3)
        passes.cancel()
        await asyncio.sleep(0.3)  # the target waits on its watch again, and only on it
        await registry.update_volume("data", moves.serving(moving().move))  # the source's step
        async with asyncio.timeout(20):
            while (await registry.volume_record("data")).machine_id != B:
                await asyncio.sleep(0.05)
    finally:
        for running in (task, passes):
            running.cancel()
        await asyncio.gather(task, passes, return_exceptions=True)
