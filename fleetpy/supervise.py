"""Background tasks that never die silently: log why one ended, then start it again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

# A task that ended is started again after this pause, doubled while it keeps failing fast.
RESTART_PAUSE = 1.0
MAX_RESTART_PAUSE = 30.0


async def supervise(name: str, task: Callable[[], Awaitable[None]], pause: float | None = None) -> None:
    """Run `task()` for ever: whenever it raises (or returns), log why and start it again.

    One that keeps failing is retried ever more slowly (up to MAX_RESTART_PAUSE) instead of
    spinning; one that ran a while before failing starts again after the first pause.
    """
    first = RESTART_PAUSE if pause is None else pause
    delay = first
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        try:
            await task()
            log.error("%s stopped; starting it again in %.0fs", name, delay)
        except Exception:
            log.exception("%s crashed; starting it again in %.0fs", name, delay)
        await asyncio.sleep(delay)
        ran_long = loop.time() - started > MAX_RESTART_PAUSE
        delay = first if ran_long else min(2 * delay, MAX_RESTART_PAUSE)
