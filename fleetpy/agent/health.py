"""Health checks of running units: the pure verdict, the probes, and one scheduler for them all.

A unit with an [X-Fleet] health check (fleetpy.unit.fleet.HealthCheck) is checked while systemd
shows it active. The checks of all units run from one asyncio loop that sleeps until the next
one is due, at most MAX_CONCURRENT_CHECKS at a time, never two of one unit at once. What a
result means (`judge`) is a pure function; the agent publishes the health it returns and
restarts the unit when it says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from fleetpy.registry import Health
from fleetpy.unit import UnitFile
from fleetpy.unit.fleet import HealthCheck

log = logging.getLogger(__name__)

MAX_CONCURRENT_CHECKS = 32
# The first check of a unit that just became active runs this soon (or after its interval, if
# shorter), so a new copy is seen healthy quickly; the next ones follow its interval.
FIRST_CHECK_AFTER = 1.0
# What a check's output may add to the published message.
MESSAGE_LIMIT = 200
STARTING = Health("starting")


def judge(
    check: HealthCheck, health: Health, ok: bool, message: str, in_start_period: bool
) -> tuple[Health, bool]:
    """The unit's health after one check, and whether to restart the unit now.

    As Docker and Kubernetes do: a success makes the unit healthy and clears the failures; a
    failure in the start period, before the first success, is shown but does not count; `threshold` failures in a row make
    it unhealthy, and then a unit with HealthCheckAction=restart is restarted (once: the
    restarted unit starts over as "starting"), unless it was restarted HealthCheckMoveAfter times
    on this machine already: then it stays unhealthy, and the engine moves it elsewhere.
    `restarts` counts the restarts made: the agent adds the one this asks for when it makes it.
    """
    if ok:
        return Health("healthy", 0, health.restarts), False
    if in_start_period and health.status == "starting":
        return replace(health, message=message), False
    failures = health.failures + 1
    if failures < check.threshold:
        return replace(health, failures=failures, message=message), False
    if health.status == "unhealthy":
        return replace(health, failures=failures, message=message), False
    restart = check.restart and not check.exhausted(health.restarts)
    return Health("unhealthy", failures, health.restarts, message), restart


@dataclass(frozen=True)
class ExecContext:
    """Who an exec check runs as and where: the unit's own User=, Group= and WorkingDirectory=."""

    user: str | None = None
    group: str | None = None
    cwd: str | None = None

    @classmethod
    def of(cls, unit_file: UnitFile) -> ExecContext:
        found: dict[str, str] = {}
        for option in unit_file.options:
            if option.section == "Service" and option.name in ("User", "Group", "WorkingDirectory"):
                found[option.name] = option.value  # the last one wins, as in systemd
        cwd = found.get("WorkingDirectory", "").lstrip("-")  # "-": systemd ignores a missing dir
        return cls(
            found.get("User") or None, found.get("Group") or None, cwd if cwd.startswith("/") else None
        )


Probe = Callable[[HealthCheck, ExecContext], Awaitable[tuple[bool, str]]]


async def probe(check: HealthCheck, context: ExecContext) -> tuple[bool, str]:
    """Run one check within its timeout: (passed, what it said when it did not)."""
    try:
        async with asyncio.timeout(check.timeout):
            if check.kind == "http":
                return await _http(check)
            if check.kind == "tcp":
                _, writer = await asyncio.open_connection(check.host, check.port)
                writer.close()
                return True, ""
            return await _exec(check, context)
    except TimeoutError:
        return False, f"{check.target()}: no answer within {check.timeout:g}s"
    except OSError as error:
        return False, f"{check.target()}: {error.strerror or error}"


async def _http(check: HealthCheck) -> tuple[bool, str]:
    reader, writer = await asyncio.open_connection(check.host, check.port)
    try:
        host = f"[{check.host}]" if ":" in check.host else check.host
        writer.write(
            f"GET {check.path} HTTP/1.0\r\nHost: {host}:{check.port}\r\n"
            "User-Agent: fleetpy-health\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        status_line = (await reader.readline()).decode("latin-1").strip()
    finally:
        writer.close()
    parts = status_line.split()
    code = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
    if 200 <= code < 400:  # Kubernetes' rule: any 2xx or 3xx passes
        return True, ""
    return False, f"{check.target()}: {status_line[:MESSAGE_LIMIT] or 'no HTTP answer'}"


async def _exec(check: HealthCheck, context: ExecContext) -> tuple[bool, str]:
    # Never through a shell: the argv the unit file gave, as the unit's own user when we can.
    as_other = os.geteuid() == 0
    process = await asyncio.create_subprocess_exec(
        *check.argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=context.cwd,
        user=context.user if as_other else None,
        group=context.group if as_other else None,
        start_new_session=True,  # its own process group, so a timeout ends all it started
    )
    try:
        output, _ = await process.communicate()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        raise
    if process.returncode == 0:
        return True, ""
    said = output.decode(errors="replace").strip()[-MESSAGE_LIMIT:]
    return False, f"{check.target()}: exit status {process.returncode}" + (f": {said}" if said else "")


@dataclass
class _Watched:
    check: HealthCheck
    context: ExecContext
    since: float  # when the unit became active: its start period counts from here
    generation: int  # a result from before the unit was watched anew is dropped
    running: bool = False


ResultCallback = Callable[[str, HealthCheck, bool, str, bool], Awaitable[None]]


class HealthMonitor:
    """Runs every watched unit's check on its interval; hands each result to `on_result`.

    on_result(name, check, passed, message, in_start_period) runs one unit's results in order.
    """

    def __init__(
        self,
        on_result: ResultCallback,
        probe: Probe = probe,
        clock: Callable[[], float] = time.monotonic,
        concurrency: int = MAX_CONCURRENT_CHECKS,
    ):
        self._on_result = on_result
        self._probe = probe
        self._clock = clock
        self._slots = asyncio.Semaphore(concurrency)
        self._watched: dict[str, _Watched] = {}
        self._due: list[tuple[float, int, str]] = []  # (when, generation, unit)
        self._generation = 0
        self._wake = asyncio.Event()
        self._running: set[asyncio.Task] = set()

    def watching(self, name: str) -> bool:
        return name in self._watched

    def watch(self, name: str, check: HealthCheck, context: ExecContext) -> None:
        """Check `name` from now on, as a unit that just became active."""
        self._generation += 1
        now = self._clock()
        self._watched[name] = _Watched(check, context, now, self._generation)
        heapq.heappush(self._due, (now + min(FIRST_CHECK_AFTER, check.interval), self._generation, name))
        self._wake.set()

    def unwatch(self, name: str) -> None:
        self._watched.pop(name, None)

    async def run(self) -> None:
        while True:
            self._wake.clear()
            delay = self.start_due()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    def start_due(self) -> float | None:
        """Start the checks that are due; the seconds until the next one (None: none watched)."""
        now = self._clock()
        while self._due and self._due[0][0] <= now:
            _, generation, name = heapq.heappop(self._due)
            watched = self._watched.get(name)
            if watched is None or watched.generation != generation:
                continue  # unwatched, or watched anew with its own entry
            heapq.heappush(self._due, (now + watched.check.interval, generation, name))
            if watched.running:
                continue  # the previous check is still on: never two of one unit at once
            watched.running = True
            task = asyncio.ensure_future(self._check(name, watched))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        return self._due[0][0] - now if self._due else None

    async def settle(self) -> None:
        """Wait for the checks under way (tests step the monitor with start_due and this)."""
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def _check(self, name: str, watched: _Watched) -> None:
        try:
            async with self._slots:
                started = self._clock()
                try:
                    ok, message = await self._probe(watched.check, watched.context)
                except Exception as error:  # a probe's own bug counts as a failed check, visibly
                    log.exception("health check of %s crashed", name)
                    ok, message = False, f"the check itself failed: {error}"
            if self._watched.get(name) is not watched:
                return  # the unit stopped or started anew meanwhile: this result is stale
            in_start_period = started - watched.since < watched.check.start_period
            await self._on_result(name, watched.check, ok, message, in_start_period)
        except Exception:
            log.exception("health result of %s could not be handled", name)
        finally:
            watched.running = False

    async def close(self) -> None:
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
