"""Moving a local volume between machines (`fleetctl volume move`): the agents' part.

The move is a record on the volume's key (fleetpy.registry.moves). An agent learns of the moves
it takes part in from its own doorbells, volume-moves/<machine>/<name>, which each step rings:
it watches that directory alone and reads the records it names. While a move is under way the
engine runs the volume's units nowhere. The source agent marks it `copying` once no unit using
the volume runs here; its fleetd then serves the volume as a tar stream to the target's fleetd
only (`pack`, behind GET /fleetpy/v1/volumes/NAME/data). The target agent spools the stream to
<volume dir>/NAME~incoming.tar, unpacks it into NAME~incoming/ with every member checked
(`refusal`), renames it into place and only then records that the volume lives here. The source
keeps its copy, renamed aside to NAME~moved-<time> once the move is done: the target's copy is
then the only other one, and deleting data is left to a person. `~` cannot appear in a volume
name, so none of these names is ever a volume's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
import shutil
import stat
import tarfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import BinaryIO, Protocol

from fleetpy.events import AgentEvents
from fleetpy.registry import (
    MOVE_COPYING,
    MOVE_DONE,
    MOVE_FAILED,
    MOVE_STOPPING,
    Registry,
    StoreError,
    VolumeMove,
    VolumeRecord,
)
from fleetpy.registry import moves as steps
from fleetpy.registry.store import HistoryLost
from fleetpy.unit.fleet import check_volume_name

log = logging.getLogger(__name__)

# Members of the stream: the volume's tree under DATA, then END, so a cut stream is never taken
# for a whole one.
DATA = "data"
END = "end-of-volume"
CHUNK = 1 << 16
WATCH_TIMEOUT = 300.0
OUTAGE_PAUSE = 1.0


class MoveError(Exception):
    """The copy cannot go on, with the reason for people."""


class VolumeSource(Protocol):
    """Where a target fetches a volume's data from: the source machine's fleetd (api.peer.Peers)."""

    async def fetch_volume(self, machine_id: str, name: str, sink: BinaryIO) -> None:
        """Write volume `name`'s tar stream, as `machine_id` serves it, into `sink`."""
        ...


# --- the stream ------------------------------------------------------------------------------


def _member(path: str, arcname: str) -> tarfile.TarInfo | None:
    """A tar header for `path` as it is (never following a symlink); None for what is not
    copied: sockets, pipes and device files."""
    info = os.lstat(path)
    member = tarfile.TarInfo(arcname)
    member.mode = stat.S_IMODE(info.st_mode)
    member.uid, member.gid = info.st_uid, info.st_gid
    member.mtime = int(info.st_mtime)
    if stat.S_ISDIR(info.st_mode):
        member.type = tarfile.DIRTYPE
    elif stat.S_ISREG(info.st_mode):
        member.type, member.size = tarfile.REGTYPE, info.st_size
    elif stat.S_ISLNK(info.st_mode):
        member.type, member.linkname = tarfile.SYMTYPE, os.readlink(path)
    else:
        return None
    return member


def pack(volume: Path, out: BinaryIO) -> int:
    """Write the tar stream of the directory `volume` into `out`; the bytes of its files."""
    size = 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, bufsize=CHUNK) as tar:

        def add(path: str, arcname: str) -> None:
            nonlocal size
            member = _member(path, arcname)
            if member is None:
                log.warning("volume move: not copying %s (not a file, directory or symlink)", path)
                return
            if member.isreg():
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                with os.fdopen(fd, "rb") as data:
                    tar.addfile(member, data)
                size += member.size
            else:
                tar.addfile(member)

        def walk_error(error: OSError) -> None:
            raise error

        add(str(volume), DATA)
        for directory, dirs, files, in_dir in _walk(volume, walk_error):
            for entry in sorted(dirs + files):
                add(os.path.join(directory, entry), posixpath.join(DATA, in_dir, entry))
        tar.addfile(tarfile.TarInfo(END))
    return size


def _walk(volume: Path, onerror: Callable[[OSError], None]):
    """os.walk of `volume` without following symlinks, with each directory's path inside it."""
    for directory, dirs, files in os.walk(volume, onerror=onerror, followlinks=False):
        inside = os.path.relpath(directory, volume)
        yield directory, dirs, files, "" if inside == "." else inside


def refusal(member: tarfile.TarInfo) -> str | None:
    """Why a member of a volume's stream must not be unpacked; None when it is fine."""
    name = member.name
    if name.startswith("/") or posixpath.isabs(name):
        return "an absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "a path that leaves the volume"
    if parts[0] != DATA:
        return f"not under {DATA}/"
    if member.islnk():
        return "a hard link (never sent by a fleetd)"
    if member.issym():
        if name == DATA:
            return "the volume itself as a symlink"
        target = member.linkname
        if posixpath.isabs(target):
            return f"a symlink out of the volume (to {target})"
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
        if resolved != DATA and not resolved.startswith(DATA + "/"):
            return f"a symlink out of the volume (to {target})"
        return None
    if not (member.isdir() or member.isreg()):
        return "a device file, pipe or other special file"
    return None


def _inside(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's extraction filter: `refusal`, then the same checks on the disk as it is now, with
    the symlinks unpacked so far resolved (a chain of them may lead where no name says)."""
    why = refusal(member)
    if why is None:
        base = os.path.realpath(dest)
        root = os.path.join(base, DATA)
        landing = os.path.realpath(os.path.join(base, member.name))
        if os.path.commonpath([landing, root]) != root:
            why = "a path that leaves the volume through a symlink"
        elif member.issym():
            link = os.path.realpath(os.path.join(base, posixpath.dirname(member.name), member.linkname))
            if os.path.commonpath([link, root]) != root:
                why = f"a symlink out of the volume (to {member.linkname})"
    if why is not None:
        raise MoveError(f"refused member {member.name!r}: {why}")
    return member


def unpack(source: BinaryIO, into: Path) -> int:
    """Unpack a volume's stream into the empty directory `into` (the volume lands in into/data);
    the bytes of its files. MoveError when a member is refused or the stream was cut short."""
    size = 0
    ended = False
    try:
        with tarfile.open(fileobj=source, mode="r|", bufsize=CHUNK) as tar:
            for member in tar:
                if ended:
                    raise MoveError(f"member {member.name!r} after the end of the volume")
                if member.name == END:
                    ended = True
                    continue
                tar.extract(member, into, numeric_owner=True, filter=_inside)
                size += member.size if member.isreg() else 0
    except tarfile.TarError as error:
        raise MoveError(f"the copy is not a whole volume: {error}") from None
    if not ended:
        raise MoveError("the copy ended before the end of the volume")
    return size


async def stream(volume: Path, write: Callable[[bytes], Awaitable[None]]) -> int:
    """`pack` the volume in a thread, handing its chunks to `write` as they come (a full pipe
    holds the packer back); the bytes of its files."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=8)
    stopped = False

    class Pipe:
        def write(self, data: bytes) -> int:
            if stopped:
                raise MoveError("the reader went away")
            asyncio.run_coroutine_threadsafe(chunks.put(bytes(data)), loop).result()
            return len(data)

    def produce() -> int:
        try:
            return pack(volume, Pipe())  # type: ignore[arg-type]
        finally:
            asyncio.run_coroutine_threadsafe(chunks.put(None), loop).result()

    packer = loop.run_in_executor(None, produce)
    try:
        while (chunk := await chunks.get()) is not None:
            await write(chunk)
    except BaseException:
        stopped = True
        while not packer.done():  # let a blocked put go through, so the packer sees `stopped`
            with contextlib.suppress(asyncio.QueueEmpty):
                chunks.get_nowait()
            await asyncio.sleep(0.01)
        raise
    return await packer


# --- the agent's part ------------------------------------------------------------------------

SERVE, PULL, SET_ASIDE = "serve", "pull", "set-aside"


def next_step(record: VolumeRecord, me: str, idle: bool, pulling: bool, here: bool) -> str | None:
    """What this machine does next for a volume's move: SERVE (it is the source and no unit
    using the volume runs here), PULL (it is the target and the data may be copied), SET_ASIDE
    (it was the source of a finished move and still has the old copy in place), or nothing."""
    move = record.move
    if move is None:
        return None
    if move.state == MOVE_STOPPING and move.source == me and idle:
        return SERVE
    if move.state == MOVE_COPYING and move.target == me and not pulling:
        return PULL
    if move.state == MOVE_DONE and move.source == me and record.machine_id != me and here:
        return SET_ASIDE
    return None


def over(record: VolumeRecord | None, me: str, pulling: bool, here: bool) -> bool:
    """Whether this machine's part in the move on `record` is over, so that its doorbell may go:
    the volume was forgotten, the move concerns other machines (a newer one), or it ended and
    there is nothing left to do here (no pull still ending, no old copy to set aside)."""
    move = record.move if record is not None else None
    if move is None or me not in (move.source, move.target):
        return True
    if move.under_way or pulling:
        return False
    return next_step(record, me, idle=False, pulling=False, here=here) is None


def volume_path(root: Path, name: str) -> Path:
    check_volume_name(name)
    return root / name


def set_aside(root: Path, name: str, why: str, now: float) -> Path | None:
    """Rename volume `name`'s directory to NAME~<why>-<time> (never deleted); None if absent."""
    path = volume_path(root, name)
    if not os.path.lexists(path):
        return None
    aside = root / f"{name}~{why}-{int(now)}"
    os.rename(path, aside)
    return aside


class VolumeMoves:
    """Follows this machine's doorbells and does its steps of the moves they name.

    `idle(name)` says whether no unit using the volume is assigned here; the agent answers it
    between its reconcile passes, so a unit the engine took away has been stopped by then.
    """

    def __init__(
        self,
        registry: Registry,
        machine_id: str,
        root: Path,
        idle: Callable[[str], Awaitable[bool]],
        source: VolumeSource | None,
        events: AgentEvents,
        clock: Callable[[], float] = time.time,
    ):
        self.registry = registry
        self.machine_id = machine_id
        self.root = root
        self.idle = idle
        self.source = source
        self.events = events
        self.clock = clock
        self.wanted = asyncio.Event()  # set by the agent after a pass: a source may serve now
        self._pulls: dict[str, asyncio.Task] = {}
        self._stale = False  # a pull ended: its own write is in etcd, not in the records read

    async def run(self) -> None:
        """Read the doorbells, and the records they name, when a doorbell changes; between
        changes, the agent's word (after each of its passes) acts again on the records as last
        read, which costs etcd nothing."""
        index = None
        doorbells: dict[str, str] = {}
        records: dict[str, VolumeRecord | None] = {}
        try:
            while True:
                try:
                    if index is None or self._stale:
                        self._stale = False
                        index = await self.registry.index()
                        doorbells = await self.registry.volume_doorbells(self.machine_id)
                        records = await self.registry.volume_records_of(doorbells) if doorbells else {}
                    self.wanted.clear()
                    await self.act(doorbells, records)
                    if await self._changed(index):
                        index = None
                except HistoryLost:
                    index = None
                except StoreError as error:
                    log.warning("agent: cannot follow volume moves: %s", error)
                    index = None
                    await asyncio.sleep(OUTAGE_PAUSE)
        finally:
            for task in self._pulls.values():
                task.cancel()

    async def _changed(self, index: int) -> bool:
        """Wait for a change of this machine's doorbells (True) or for the agent's word or the
        timeout (False)."""
        watch = asyncio.ensure_future(
            self.registry.wait(index, "volume-moves", self.machine_id, timeout=WATCH_TIMEOUT)
        )
        poked = asyncio.ensure_future(self.wanted.wait())
        try:
            done, _ = await asyncio.wait([watch, poked], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watch, poked):
                task.cancel()
            await asyncio.gather(watch, poked, return_exceptions=True)
        return watch in done and watch.result() is not None

    async def act(self, doorbells: dict[str, str], records: dict[str, VolumeRecord | None]) -> None:
        """This machine's step of every move its doorbells name, each inside its own error
        boundary; a doorbell whose move needs nothing more of this machine is removed."""
        for name, seen in list(doorbells.items()):
            if name not in records:
                continue  # its record cannot be read (logged): the doorbell stays for later
            record = records[name]
            try:
                if record is not None:
                    await self._step(name, record)
                pulling = name in self._pulls
                if over(record, self.machine_id, pulling, os.path.lexists(volume_path(self.root, name))):
                    move = record.move if record is not None else None
                    if move is not None and move.state == MOVE_FAILED and move.target == self.machine_id:
                        await asyncio.to_thread(self._clean, name)  # what a copy cut short left here
                    await self.registry.answer_volume_doorbell(self.machine_id, name, seen)
                    del doorbells[name]
            except StoreError:
                raise
            except Exception as error:  # noqa: BLE001 - one volume must not stop the others
                log.error("agent: volume %s: cannot do this machine's part of its move: %s", name, error)

    async def _step(self, name: str, record: VolumeRecord) -> None:
        move = record.move
        if move is None or move.state == MOVE_FAILED or self.machine_id not in (move.source, move.target):
            return  # nothing to ask systemd or the disk
        # Only the source waits for its units (the target's agent is not asked: its passes are
        # no business of the move).
        idle = move.state == MOVE_STOPPING and move.source == self.machine_id and await self.idle(name)
        here = os.path.lexists(volume_path(self.root, name))
        step = next_step(record, self.machine_id, idle, name in self._pulls, here)
        if step == SERVE:
            log.info("agent: volume %s: its units are stopped; serving it to %s", name, move.target)
            await self.registry.update_volume(name, steps.serving(move))
        elif step == PULL:
            self._pulls[name] = asyncio.create_task(self._pull(name, move))
        elif step == SET_ASIDE:
            aside = set_aside(self.root, name, "moved", move.finished or self.clock())
            log.info("agent: volume %s moved to %s; the old copy is kept at %s", name, move.target, aside)

    async def _pull(self, name: str, move: VolumeMove) -> None:
        try:
            await self._pull_once(name, move)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - logged; the record still says copying, so it is tried again
            log.exception("agent: volume %s: pulling it failed", name)
        finally:
            self._pulls.pop(name, None)
            self._stale = True  # read again: a pull that failed unrecorded is tried again
            self.wanted.set()

    async def _pull_once(self, name: str, move: VolumeMove) -> None:
        started = time.monotonic()
        try:
            size = await self._copy(name, move)
        except (StoreError, asyncio.CancelledError):
            raise
        except Exception as error:  # noqa: BLE001 - any failure of the copy fails the move
            reason = f"copying from {move.source[:8]}... failed: {error}"
            log.warning("agent: volume %s: %s", name, reason)
            after = await self.registry.update_volume(name, steps.failed(move, reason, self.clock()))
            if after is not None and after.move is not None and after.move.reason == reason:
                self.events.volume_move_failed(name, move, reason)
            await asyncio.to_thread(self._clean, name)
            return
        after = await self.registry.update_volume(name, steps.arrived(move, self.clock(), size))
        if after is not None and after.machine_id == self.machine_id and after.move is not None:
            log.info("agent: volume %s arrived (%d bytes in %.1fs)", name, size, time.monotonic() - started)
            self.events.volume_moved(name, after.move)
        else:
            # The move was failed meanwhile (a machine seemed gone): the volume stays on the source.
            aside = set_aside(self.root, name, "unused", self.clock())
            log.warning("agent: volume %s: the move ended without it; the copy is kept at %s", name, aside)

    def _clean(self, name: str) -> None:
        """Remove what an earlier copy of `name` left (never following a planted symlink)."""
        spool, work = self.root / f"{name}~incoming.tar", self.root / f"{name}~incoming"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(spool)
        if os.path.islink(work):
            os.unlink(work)
        elif os.path.lexists(work):
            shutil.rmtree(work)

    async def _copy(self, name: str, move: VolumeMove) -> int:
        """Fetch, check and unpack the volume, and put it in place; the bytes of its files."""
        if self.source is None:
            raise MoveError("this fleetd cannot reach other machines' APIs")
        volume_path(self.root, name)
        self.root.mkdir(mode=0o750, parents=True, exist_ok=True)
        await asyncio.to_thread(self._clean, name)
        spool, work = self.root / f"{name}~incoming.tar", self.root / f"{name}~incoming"
        fd = os.open(spool, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as sink:
                await self.source.fetch_volume(move.source, name, sink)
            os.mkdir(work, 0o700)
            size = await asyncio.to_thread(self._unpack, spool, work)
            await asyncio.to_thread(self._place, name, work)
        finally:
            await asyncio.to_thread(self._clean, name)
        return size

    @staticmethod
    def _unpack(spool: Path, work: Path) -> int:
        with open(spool, "rb") as source:
            return unpack(source, work)

    def _place(self, name: str, work: Path) -> None:
        """Rename the unpacked volume into place; an old directory there is set aside first."""
        unpacked = work / DATA
        info = os.lstat(unpacked)
        if not stat.S_ISDIR(info.st_mode):
            raise MoveError("the copy holds no volume directory")
        set_aside(self.root, name, "replaced", self.clock())
        os.rename(unpacked, volume_path(self.root, name))
