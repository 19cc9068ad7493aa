"""The recorder: a bounded in-memory queue in front of this fleetd's event history in etcd."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from fleetpy.conf import metrics
from fleetpy.events.kinds import event_type
from fleetpy.registry import Event, Registry, StoreError

log = logging.getLogger(__name__)

HISTORY = 200  # events kept in etcd per fleetd; the oldest go first
QUEUE = 1000  # events waiting for etcd; beyond this the oldest are dropped (and counted)
BATCH_DELAY = 0.1  # seconds to gather a burst into one write
RETRY_PAUSE = 1.0


def utc_stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class Recorder:
    """Takes events from any code in fleetd's loop and writes them to `events/<machine>` in batches.

    `emit` never blocks, never raises and never waits for etcd: events queue in memory (at most
    QUEUE; the oldest are dropped first and counted in `dropped`) while etcd is away, and
    reach etcd when it is back. This recorder is the only writer of its machine's key, so it
    keeps the history in memory and rewrites it whole, trimmed to the newest HISTORY events.
    Without a registry (tests of other parts) events are kept in `queued` only.
    """

    def __init__(
        self,
        registry: Registry | None = None,
        machine_id: str = "",
        *,
        history: int = HISTORY,
        queue: int = QUEUE,
        clock: Callable[[], float] = time.time,
        batch_delay: float = BATCH_DELAY,
        retry_pause: float = RETRY_PAUSE,
    ):
        self.registry = registry
        self.machine_id = machine_id
        self.history_size = history
        self.clock = clock
        self.batch_delay = batch_delay
        self.retry_pause = retry_pause
        self.queued: collections.deque[Event] = collections.deque(maxlen=queue)
        self.dropped = 0
        self._history: list[Event] | None = None  # read back from etcd on the first write
        self._seq = 0
        self._wanted: asyncio.Event | None = None

    def emit(self, kind: str, message: str, *, unit: str = "", machine_id: str = "") -> None:
        try:
            self._seq += 1
            event = Event(
                time=utc_stamp(self.clock()),
                reporter=self.machine_id,
                seq=self._seq,
                kind=kind,
                type=event_type(kind),
                message=message,
                unit=unit,
                machine_id=machine_id or self.machine_id,
            )
            if len(self.queued) == self.queued.maxlen:
                self.dropped += 1
                metrics.EVENTS_DROPPED.inc()
            self.queued.append(event)
            log.log(
                logging.WARNING if event.type == "Warning" else logging.INFO, "event %s %s", kind, message
            )
            if self._wanted is not None:
                self._wanted.set()
        except Exception:  # noqa: BLE001 - recording must never hurt the caller
            log.exception("cannot record event %s", kind)

    async def run(self) -> None:
        """Write queued events until cancelled; etcd outages only delay them."""
        self._wanted = asyncio.Event()
        while True:
            if not self.queued:
                await self._wanted.wait()
            self._wanted.clear()
            await asyncio.sleep(self.batch_delay)
            try:
                await self.flush()
            except StoreError as error:
                log.debug("events wait for etcd: %s", error)
                await asyncio.sleep(self.retry_pause)
            except Exception:  # noqa: BLE001 - a bad batch must not stop recording
                log.exception("cannot write events; dropping %d", len(self.queued))
                self.queued.clear()

    async def flush(self) -> None:
        """Write what is queued now; raises StoreError (keeping the events) if etcd is away."""
        if self.registry is None or not self.queued:
            return
        if self._history is None:
            self._history = await self.registry.events(self.machine_id)
            # A restarted fleetd numbers on from its previous life, so (reporter, seq) stays unique.
            last = max((e.seq for e in self._history), default=0)
            if last:
                self._renumber(last)
        batch = list(self.queued)
        history = (self._history + batch)[-self.history_size :]
        await self.registry.put_events(self.machine_id, history)
        self._history = history
        # Not len(batch): the queue may have dropped some of the batch meanwhile.
        while self.queued and self.queued[0].seq <= batch[-1].seq:
            self.queued.popleft()

    def _renumber(self, after: int) -> None:
        renumbered = [
            Event(e.time, e.reporter, after + i, e.kind, e.type, e.message, e.unit, e.machine_id)
            for i, e in enumerate(self.queued, start=1)
        ]
        self.queued.clear()
        self.queued.extend(renumbered)
        self._seq = after + len(renumbered)

    async def close(self, timeout: float = 1.0) -> None:
        """Write what is left, giving etcd at most `timeout` seconds (fleetd is stopping)."""
        with contextlib.suppress(StoreError, TimeoutError):
            await asyncio.wait_for(self.flush(), timeout)
