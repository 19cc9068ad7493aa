"""Helpers shared by the tests that run real labs: waiting on conditions, short lab dirs."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fleetpy.lab.lab import Lab


def wait_for(
    what: str, predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.05
) -> object:
    """Poll `predicate` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(interval)
    return value


@contextmanager
def short_lab_dir(tag: str) -> Iterator[Path]:
    """A lab dir short enough for unit sockets and on tmpfs; whatever a test left up is torn down."""
    path = Path(f"/run/{tag}{os.getpid()}")
    try:
        yield path
    finally:
        Lab(path).down()
        shutil.rmtree(path, ignore_errors=True)
