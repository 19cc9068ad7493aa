"""Helpers shared by the tests that run real labs: waiting on conditions, short lab dirs, fleetctl."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


@contextmanager
def lab_up(tag: str, *flags: str) -> Iterator[Lab]:
    """A lab started by `fleetpy lab up --dir DIR *flags` as its own process, in a short lab dir
    named after `tag` (see `short_lab_dir`), and torn down afterwards."""
    with short_lab_dir(tag) as path:
        argv = [sys.executable, "-m", "fleetpy.cli.fleetpy", "lab", "up", "--dir", str(path), *flags]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        yield Lab(path)


def fleetctl(lab: Lab, *args: str) -> str:
    """Run fleetctl as its own process against the lab; its output, once it succeeded."""
    env = {**os.environ, "FLEETCTL_ENDPOINT": lab.endpoint()}
    argv = [sys.executable, "-m", "fleetpy.cli.fleetctl", *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def active_on(lab: Lab, unit: str) -> list[str]:
    """The nodes where `unit` is active, by list-units."""
    assert lab.state is not None
    by_ip = {n.ip: n.name for n in lab.state.nodes}
    return sorted(
        by_ip[fields[1].rsplit("/", 1)[-1]]
        for line in fleetctl(lab, "list-units", "--no-legend", "--full").splitlines()
        if (fields := line.split()) and fields[0] == unit and fields[2] == "active"
    )
