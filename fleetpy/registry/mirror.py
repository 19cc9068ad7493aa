"""A watch-fed copy of the registry in memory, and a Store that reads from it.

The engine and the API read the same records again and again; listing them from etcd each
time made every scheduling pass and every GET cost O(cluster) in etcd requests. A `Mirror`
lists the registry's prefix once, then keeps its copy current from one prefix watch, resuming
from the index it has seen and listing again when the store lost that history. `MirrorStore`
puts it behind the `Store` seam: reads come from the copy, writes go to etcd and return once
the copy holds them (read-your-writes), so everything above, the registry's parsing and its
quarantine of unreadable records included, works unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Sequence

from fleetpy.conf import metrics
from fleetpy.registry.store import Change, HistoryLost, Listing, Op, Store, StoreError, Unavailable

log = logging.getLogger(__name__)

WATCH_TIMEOUT = 60.0
OUTAGE_PAUSE = 1.0
# A write's own change normally shows within milliseconds, and within seconds on a busy
# process; past this the copy is listed again, which costs far more than waiting.
CATCH_UP = 30.0
MIRROR_CALL = "mirror"  # the metrics' `call` label of the copy's own listings


class Mirror:
    """The records under `prefix` (but those under `skip`), as of `index`.

    `dirty` collects the top directories changed since a reader last took them: the engine
    plans only when something it plans from changed. Run `run()` as a task.

    Of the skipped records, those `note(key, text)` finds worth it (in a listing or a change)
    are kept aside until a reader takes them (`take_noted`), and mark their directory dirty;
    the others cost no more than being skipped.
    """

    def __init__(
        self,
        store: Store,
        prefix: str,
        skip: Collection[str] = (),
        note: Callable[[str, str], bool] | None = None,
    ):
        self.store = store
        self.prefix = prefix
        self._skip = tuple(prefix + directory.strip("/") + "/" for directory in skip)
        self._note = note
        self._noted: dict[str, str] = {}
        self.texts: dict[str, str] = {}
        self.index = -1  # every change up to here is in `texts`; -1 before the first listing
        self.lists = 0  # how many times the prefix was listed (once, unless history was lost)
        self._dirty: set[str] = set()
        self._changed = asyncio.Event()
        self._caught_up = asyncio.Condition()
        self._task: asyncio.Task | None = None

    @property
    def synced(self) -> bool:
        return self.index >= 0

    def start(self) -> None:
        """Run the mirror in a task of its own, unless it runs already."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def close(self, *_args: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def holds(self, key: str) -> bool:
        """Whether `key` is one the mirror keeps (not under a skipped directory)."""
        return not key.startswith(self._skip)

    async def run(self) -> None:
        # Its requests are its own (the metrics' `call` label), not those of whichever registry
        # call happened to start it.
        with metrics.registry_call(MIRROR_CALL):
            await self._run()

    async def _run(self) -> None:
        listed = False
        while True:
            try:
                if not listed:
                    await self._list()
                    listed = True
                await self._follow()
            except HistoryLost:
                log.info("registry mirror: the watch history is gone; listing %s again", self.prefix)
                listed = False
            except StoreError as error:
                # The copy stays as it was; the watch resumes from its index when etcd is back.
                log.warning("registry mirror: %s", error)
                await asyncio.sleep(OUTAGE_PAUSE)
            except Exception:  # noqa: BLE001 - the copy must outlive a bad moment
                log.exception("registry mirror failed; listing again")
                listed = False
                await asyncio.sleep(OUTAGE_PAUSE)

    async def _list(self) -> int:
        # The index first: changes after it that the listing already holds are applied again,
        # which leaves each key as its newest change made it.
        index = await self.store.index(self.prefix)
        found = await self.store.list(self.prefix)
        self.texts = {k: v for k, v in found.items() if not k.startswith(self._skip)}
        for key, text in found.items():
            if key.startswith(self._skip):
                self._keep_if_noted(key, text)
        self.index = max(self.index, index)
        self.lists += 1
        self._dirty.add("*")
        await self._notify()
        return index

    async def _follow(self) -> None:
        if self.apply(await self.store.changes(self.prefix, self.index, WATCH_TIMEOUT)):
            await self._notify()

    def apply(self, changes: Sequence[Change]) -> bool:
        """Apply the changes the copy does not hold yet; whether there were any."""
        fresh = [change for change in changes if change.index > self.index]
        for change in fresh:
            if change.key.startswith(self._skip):
                if change.value is not None:
                    self._keep_if_noted(change.key, change.value)
                continue
            if change.value is None:
                self.texts.pop(change.key, None)
            else:
                self.texts[change.key] = change.value
            self._dirty.add(change.key[len(self.prefix) :].split("/", 1)[0])
        if fresh:
            self.index = fresh[-1].index
        return bool(fresh)

    def _keep_if_noted(self, key: str, text: str) -> None:
        if self._note is None:
            return
        try:
            noted = self._note(key, text)
        except Exception:  # noqa: BLE001 - one record the reader cannot judge must not stop the copy
            log.exception("registry mirror: cannot judge %s", key)
            return
        if noted:
            self._noted[key] = text
            self._dirty.add(key[len(self.prefix) :].split("/", 1)[0])

    def take_noted(self) -> dict[str, str]:
        """The skipped records `note` found worth it since the last call, by key (newest text)."""
        noted, self._noted = self._noted, {}
        return noted

    async def _notify(self) -> None:
        async with self._caught_up:
            self._caught_up.notify_all()
        if self._dirty:
            self._changed.set()

    async def reach(self, index: int, timeout: float = CATCH_UP) -> bool:
        """Wait until the copy holds every change up to `index`; False after `timeout`."""
        return await self.until(lambda: self.index >= index, timeout)

    async def until(self, done: Callable[[], bool], timeout: float = CATCH_UP) -> bool:
        """Wait until `done()` holds of the copy; False after `timeout`."""
        async with self._caught_up:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._caught_up.wait_for(done)
        return done()

    async def changed(self, timeout: float) -> set[str]:
        """The top directories changed since the last call ("*": all of them, after a listing),
        once there is any; empty after `timeout` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        self._changed.clear()
        dirty, self._dirty = self._dirty, set()
        return dirty

    async def resync(self) -> None:
        """List everything again now (when the copy may have missed its own writes)."""
        await self._list()


class MirrorStore:
    """A Store whose reads come from a `Mirror` and whose writes go to the real store; each
    write returns once the mirror holds it, so a reader sees its own writes.

    With `start=True` the first read starts the mirror; until it has listed the registry, and
    for the directories it skips, reads go to the real store.
    """

    def __init__(self, mirror: Mirror, *, start: bool = False):
        self.mirror = mirror
        self.inner = mirror.store
        self._start = start
        self.atomic_batches = self.inner.atomic_batches

    def _from_copy(self, key: str) -> bool:
        if self._start:
            self.mirror.start()
        return self.mirror.synced and self.mirror.holds(key)

    async def _written(self, index: int) -> None:
        if self.mirror.synced and index and not await self.mirror.reach(index):
            await self.mirror.resync()

    # Reads: from the copy.
    async def get(self, key: str) -> str | None:
        if not self._from_copy(key):
            return await self.inner.get(key)
        return self.mirror.texts.get(key)

    async def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        if not all(self._from_copy(key) for key in keys):
            return await self.inner.get_many(keys)
        texts = self.mirror.texts
        return {key: texts[key] for key in keys if key in texts}

    async def list(self, prefix: str) -> Listing:
        directory = prefix.rstrip("/") + "/"
        if not self._from_copy(directory):
            return await self.inner.list(prefix)
        return Listing(
            {k: v for k, v in self.mirror.texts.items() if k.startswith(directory)}, self.mirror.index
        )

    async def index(self, prefix: str) -> int:
        if not self._from_copy(prefix):
            return await self.inner.index(prefix)
        return self.mirror.index

    # Writes: to the store, then wait for the copy.
    async def put(
        self,
        key: str,
        value: str,
        ttl: float | None = None,
        *,
        create_only: bool = False,
        prev_value: str | None = None,
    ) -> int:
        index = await self.inner.put(key, value, ttl, create_only=create_only, prev_value=prev_value)
        await self._written(index)
        return index

    async def apply(self, ops: Sequence[Op]) -> int:
        index = await self.inner.apply(ops)
        await self._written(index)
        return index

    async def compare_and_put(
        self, key: str, value: str, prev_value: str | None, also: Sequence[Op] = ()
    ) -> int:
        index = await self.inner.compare_and_put(key, value, prev_value, also)
        await self._written(index)
        return index

    async def refresh(self, key: str, ttl: float) -> bool:
        return await self.inner.refresh(key, ttl)  # a refresh changes no record

    async def delete(self, key: str, *, prev_value: str | None = None, recursive: bool = False) -> bool:
        deleted = await self.inner.delete(key, prev_value=prev_value, recursive=recursive)
        if deleted and self.mirror.synced:
            # No index comes back from a delete: wait until the copy has it gone.
            directory = key.rstrip("/") + "/"

            def gone() -> bool:
                texts = self.mirror.texts
                return key not in texts and not (recursive and any(k.startswith(directory) for k in texts))

            if not await self.mirror.until(gone):
                await self.mirror.resync()
        return deleted

    # Watches: the store's own, answered once the copy holds what they saw.
    async def wait(self, prefix: str, after_index: int, timeout: float) -> int | None:
        index = await self.inner.wait(prefix, after_index, timeout)
        if index is not None and self.mirror.synced:
            await self.mirror.reach(index)
        return index

    async def changes(self, prefix: str, after_index: int, timeout: float) -> list[Change]:
        return await self.inner.changes(prefix, after_index, timeout)

    def last_failure(self) -> float:
        return self.inner.last_failure()

    def outage(self) -> Unavailable | None:
        return self.inner.outage()

    async def close(self) -> None:
        await self.mirror.close()  # the mirror's store belongs to whoever made it
