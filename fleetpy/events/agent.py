"""What the agent sees as events: its machine joining and leaving, units started or failed,
etcd going away and coming back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from fleetpy.conf.values import machine_id_prefix
from fleetpy.events import kinds
from fleetpy.events.recorder import Recorder
from fleetpy.registry import Health, Machine, VolumeMove

if TYPE_CHECKING:
    from fleetpy.unit.fleet import HealthCheck

log = logging.getLogger(__name__)

FailureReason = Callable[[str], Awaitable[str]]


class AgentEvents:
    """The agent's events. `failure_reason(name)` asks systemd why a unit failed."""

    def __init__(self, recorder: Recorder | None = None, failure_reason: FailureReason | None = None):
        self.recorder = recorder or Recorder()
        self.failure_reason = failure_reason
        self._active: dict[str, str] = {}
        self._etcd_down_since: float | None = None
        self._tasks: set[asyncio.Task] = set()

    def joined(self, machine: Machine, again: bool = False) -> None:
        metadata = ",".join(f"{k}={v}" for k, v in sorted(machine.metadata.items())) or "no metadata"
        how = "registered again after its record expired" if again else "joined"
        self.recorder.emit(
            kinds.MACHINE_JOINED,
            f"machine {machine_id_prefix(machine.id)} {how} ({machine.public_ip or 'no IP'}, {metadata})",
            machine_id=machine.id,
        )

    def left(self, machine_id: str) -> None:
        self.recorder.emit(
            kinds.MACHINE_LEFT,
            f"machine {machine_id_prefix(machine_id)} left: fleetd stopped; its units keep running",
        )

    def start_done(self, name: str, result: str) -> None:
        """A start job of the agent ended; "done" means systemd started the unit."""
        if result == "done":
            self.recorder.emit(kinds.UNIT_STARTED, f"{name} started", unit=name)

    def unit_state(self, name: str, active: str, sub: str) -> None:
        """systemd reported a unit's state; a unit turning failed is recorded with systemd's reason."""
        before, self._active[name] = self._active.get(name), active
        if active == "failed" and before != "failed":
            task = asyncio.ensure_future(self._failed(name, sub))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _failed(self, name: str, sub: str) -> None:
        reason = ""
        if self.failure_reason is not None:
            try:
                reason = await self.failure_reason(name)
            except Exception as error:  # noqa: BLE001 - the failure is worth recording anyway
                log.debug("cannot ask systemd why %s failed: %s", name, error)
        self.recorder.emit(
            kinds.UNIT_FAILED, f"{name} failed: {reason or 'systemd did not say why'}", unit=name
        )

    def health(self, name: str, before: str, after: Health, check: HealthCheck, restarting: bool) -> None:
        """A unit's health check changed its verdict; `check` is its [X-Fleet] health check, and
        `restarting` says whether the agent restarts the unit for it."""
        if after.status == "healthy":
            again = " again" if before == "unhealthy" else ""
            self.recorder.emit(kinds.UNIT_HEALTHY, f"{name} healthy{again} ({check.target()})", unit=name)
        elif after.status == "unhealthy":
            if not check.restart:
                what = "left running (HealthCheckAction=none)"
            elif not restarting:
                what = (
                    f"not restarted here again after {after.restarts} restarts "
                    f"(HealthCheckMoveAfter={check.move_after}): the engine moves it to another machine"
                )
            else:
                what = f"restarting it (restart {after.restarts + 1})"
            self.recorder.emit(
                kinds.UNIT_UNHEALTHY,
                f"{name} unhealthy after {after.failures} failed health checks in a row: {after.message}; {what}",
                unit=name,
            )

    def volume_moved(self, name: str, move: VolumeMove) -> None:
        """This machine, the target, holds the moved volume now."""
        took = move.finished - move.started
        self.recorder.emit(
            kinds.VOLUME_MOVED,
            f"volume {name} moved from {machine_id_prefix(move.source)} to {machine_id_prefix(move.target)} "
            f"in {took:.1f}s ({move.size} bytes)",
            machine_id=move.target,
        )

    def volume_move_failed(self, name: str, move: VolumeMove, reason: str) -> None:
        self.recorder.emit(
            kinds.VOLUME_MOVE_FAILED, kinds.volume_move_failed(name, move, reason), machine_id=move.target
        )

    def forget(self, name: str) -> None:
        self._active.pop(name, None)

    def etcd(self, error: Exception | None) -> None:
        """The result of a heartbeat: None when etcd answered, else the error."""
        now = self.recorder.clock()
        if error is not None and self._etcd_down_since is None:
            self._etcd_down_since = now
            self.recorder.emit(kinds.ETCD_UNREACHABLE, f"etcd unreachable: {error}")
        elif error is None and self._etcd_down_since is not None:
            away, self._etcd_down_since = now - self._etcd_down_since, None
            self.recorder.emit(kinds.ETCD_REACHABLE, f"etcd reachable again after {away:.1f}s")
