"""What this machine offers (capacity) and what it is like now (live facts), read from the host.

Reading is split from deciding: the parsers and `changed_enough` are pure (tests feed them
text), `HostFacts` only opens files and runs the executables of the facts directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Protocol

from fleetpy.unit.fleet import Constraint

log = logging.getLogger(__name__)

Facts = dict[str, str | float]

# How long one facts.d executable may run; a slow one is skipped for that round.
EXECUTABLE_TIMEOUT = 5.0
# A load average matters when it moves this much, or this share of its value when higher; free
# memory, swap or disk by FREE_SHARE of the total. Smaller moves are not worth waking the
# engine for.
LOAD_STEP = 0.5
LOAD_SHARE = 0.1
FREE_SHARE = 0.05
_FREE_OF = {"memory_free": "memory", "swap_free": "swap_total", "disk_free": "disk"}
_LOADS = ("load1", "load5", "load15")
_FACT_KEY = re.compile(r"[A-Za-z0-9_.:/-]+")
# cgroup v1 writes "no limit" as a huge number rounded to the page size.
_UNLIMITED = 1 << 60


class FactSource(Protocol):
    """Where an agent gets its machine's live facts (a fake in tests)."""

    async def read(self) -> Facts: ...


# --- pure parsers ----------------------------------------------------------------------------


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as bytes: {"MemTotal": ..., "MemAvailable": ..., ...}."""
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        words = rest.split()
        if words and words[0].isdigit():
            values[key.strip()] = int(words[0]) * (1024 if words[1:] == ["kB"] else 1)
    return values


def parse_loadavg(text: str) -> dict[str, float]:
    words = text.split()
    return {key: float(word) for key, word in zip(_LOADS, words[:3], strict=False)}


def parse_fact_lines(text: str, source: str) -> Facts:
    """`key=value` lines, as Facter's external fact executables print them; numbers become numbers."""
    facts: Facts = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not _FACT_KEY.fullmatch(key):
            log.warning("facts: %s printed %r, not key=value; ignored", source, line[:80])
            continue
        facts[key] = _number_or_text(value)
    return facts


def _number_or_text(value: str) -> str | float:
    try:
        return float(value)
    except ValueError:
        return value


def cgroup_memory_limit(proc_cgroup: str, read: Callable[[str], str | None]) -> int | None:
    """The memory limit of this process's cgroup (v2 memory.max, else v1), or None."""
    for hierarchy, path in _cgroup_paths(proc_cgroup):
        if hierarchy == "":
            text = read(f"/sys/fs/cgroup{path}/memory.max")
        elif hierarchy == "memory":
            text = read(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
        else:
            continue
        if text and text.strip().isdigit() and int(text) < _UNLIMITED:
            return int(text)
    return None


def cgroup_cpu_limit(proc_cgroup: str, read: Callable[[str], str | None]) -> float | None:
    """The CPUs a cgroup quota allows this process (v2 cpu.max, else v1 cfs quota), or None."""
    for hierarchy, path in _cgroup_paths(proc_cgroup):
        if hierarchy == "":
            text = read(f"/sys/fs/cgroup{path}/cpu.max")
            words = (text or "").split()
            if len(words) == 2 and words[0].isdigit() and words[1].isdigit():
                return int(words[0]) / int(words[1])
        elif "cpu" in hierarchy.split(","):
            base = f"/sys/fs/cgroup/{hierarchy}{path}"
            quota, period = read(f"{base}/cpu.cfs_quota_us"), read(f"{base}/cpu.cfs_period_us")
            if quota and period and quota.strip().isdigit() and period.strip().isdigit():
                return int(quota) / int(period)
    return None


def _cgroup_paths(proc_cgroup: str) -> list[tuple[str, str]]:
    """(hierarchy, path) of each line of /proc/self/cgroup; "" is the unified (v2) hierarchy."""
    paths = []
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            paths.append((parts[1], parts[2].rstrip("/")))
    return paths


def changed_enough(
    published: Mapping[str, object], fresh: Mapping[str, object], asked: Iterable[Constraint] = ()
) -> bool:
    """Whether `fresh` facts are worth a write over `published`: any fact other than load and
    free space on any change, those past their step or when they make a constraint some pending
    unit states (`asked`) hold or stop holding."""
    if published.keys() != fresh.keys():
        return True
    if any(c.holds(published.get(c.key)) != c.holds(fresh.get(c.key)) for c in asked):
        return True
    for key, value in fresh.items():
        old = published[key]
        if key in _LOADS:
            before, now = float(old), float(value)  # type: ignore[arg-type]
            if abs(now - before) >= max(LOAD_STEP, LOAD_SHARE * before):
                return True
        elif key in _FREE_OF:
            total = float(fresh.get(_FREE_OF[key]) or 0)  # type: ignore[arg-type]
            if abs(float(value) - float(old)) >= max(FREE_SHARE * total, 1.0):  # type: ignore[arg-type]
                return True
        elif value != old:
            return True
    return False


# --- reading the host ------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def detect_capacity(disk_path: str) -> dict[str, float]:
    """CPUs, memory and disk this machine offers units, from the host and fleetd's cgroup."""
    proc_cgroup = _read("/proc/self/cgroup") or ""
    cpus = float(len(os.sched_getaffinity(0)))
    quota = cgroup_cpu_limit(proc_cgroup, _read)
    memory = float(parse_meminfo(_read("/proc/meminfo") or "").get("MemTotal", 0))
    limit = cgroup_memory_limit(proc_cgroup, _read)
    capacity = {
        "cpus": min(cpus, quota) if quota else cpus,
        "memory": min(memory, limit) if limit else memory,
    }
    disk = _disk(disk_path)
    if disk is not None:
        capacity["disk"] = float(disk.total)
    return capacity


def _disk(path: str):
    # The unit directory may not exist yet: its nearest existing parent is on the same disk.
    candidate = Path(path)
    while not candidate.exists() and candidate != candidate.parent:
        candidate = candidate.parent
    try:
        return shutil.disk_usage(candidate)
    except OSError:
        return None


class HostFacts:
    """The live facts of this host: uname, capacity, load, free memory, swap and disk, and
    what each executable in `facts_dir` prints."""

    def __init__(self, capacity: Mapping[str, float], disk_path: str, facts_dir: str):
        self.capacity = dict(capacity)
        self.disk_path = disk_path
        self.facts_dir = Path(facts_dir)
        uname = platform.uname()
        self._static: Facts = {
            "os": uname.system.lower(),
            "arch": uname.machine,
            "kernel": uname.release,
            "hostname": uname.node,
            **self.capacity,
        }

    async def read(self) -> Facts:
        facts: Facts = {**await self._executables(), **self._static}
        meminfo = parse_meminfo(_read("/proc/meminfo") or "")
        for fact, key in (
            ("memory_free", "MemAvailable"),
            ("swap_free", "SwapFree"),
            ("swap_total", "SwapTotal"),
        ):
            if key in meminfo:
                facts[fact] = float(meminfo[key])
        facts.update(parse_loadavg(_read("/proc/loadavg") or ""))
        disk = _disk(self.disk_path)
        if disk is not None:
            facts["disk_free"] = float(disk.free)
        return facts

    async def _executables(self) -> Facts:
        try:
            paths = sorted(p for p in self.facts_dir.iterdir() if p.is_file() and os.access(p, os.X_OK))
        except OSError:
            return {}
        facts: Facts = {}
        for path in paths:
            facts.update(await _run_fact(path))
        return facts


async def _run_fact(path: Path) -> Facts:
    """One executable's facts; one that fails or hangs gives none this round, and says why."""
    try:
        proc = await asyncio.create_subprocess_exec(
            str(path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
    except OSError as error:
        log.warning("facts: cannot run %s: %s", path, error)
        return {}
    try:
        async with asyncio.timeout(EXECUTABLE_TIMEOUT):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        log.warning("facts: %s ran over %.0fs; skipped", path, EXECUTABLE_TIMEOUT)
        return {}
    if proc.returncode != 0:
        log.warning("facts: %s exited with %s; skipped", path, proc.returncode)
        return {}
    return parse_fact_lines(out.decode(errors="replace"), str(path))
