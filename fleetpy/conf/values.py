"""How fleet writes durations, machine metadata and machine ids: one reader for every layer.

fleetd's configuration, `cloud-config validate` and the lab all call these, so what one of
them accepts the others accept too (a TTL of "-5s" or metadata "role=" used to pass the
validator and then stop fleetd at start).
"""

from __future__ import annotations

import re

# Go's time.ParseDuration units, which fleet and locksmith use for their durations.
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PART = re.compile(rf"({_NUMBER})(ns|us|µs|ms|s|m|h)")
_DURATION = re.compile(rf"\+?(?:{_NUMBER}(?:ns|us|µs|ms|s|m|h))+")
MIN_AGENT_TTL = 1.0
SHORT_ID = 8


class BadValue(ValueError):
    """A value fleet would not read; the message says what to write instead."""


def parse_duration(value: str, bare_seconds: bool = True) -> float:
    """Seconds in a duration written as Go does ("10s", "1m30s", "500ms") or as bare seconds ("7").

    fleetd reads bare numbers as seconds; `bare_seconds=False` is Go's own rule, for the
    options of other CoreOS daemons (locksmith) that read durations with Go.
    """
    text = value.strip().strip('"')
    if bare_seconds and re.fullmatch(_NUMBER, text):
        return float(text)
    if text.startswith("-"):
        raise BadValue(f"bad duration {value!r}: a duration here cannot be negative")
    if not _DURATION.fullmatch(text):
        raise BadValue(f"bad duration {value!r}: use seconds (10) or Go style (10s, 1m30s, 500ms)")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _PART.findall(text))


def parse_agent_ttl(value: str) -> float:
    """The machine heartbeat TTL: a duration of at least a second (the engine's lease uses it too)."""
    seconds = parse_duration(value)
    if seconds < MIN_AGENT_TTL:
        raise BadValue(f"agent_ttl {value!r} is too short: it must be at least {MIN_AGENT_TTL:.0f}s")
    return seconds


def parse_positive_duration(value: str) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise BadValue(f"bad duration {value!r}: it must be more than 0")
    return seconds


def parse_metadata(value: str) -> dict[str, str]:
    """`role=web,zone=a` -> {"role": "web", "zone": "a"}; every pair needs a key and a value."""
    metadata = {}
    for pair in filter(None, (p.strip() for p in value.strip().strip('"').split(","))):
        key, sep, val = pair.partition("=")
        if not sep or not key.strip() or not val.strip():
            raise BadValue(
                f"bad metadata {pair!r}: expected key=value pairs joined by commas, e.g. role=web,zone=a"
            )
        metadata[key.strip()] = val.strip()
    return metadata


def format_metadata(metadata: dict[str, str]) -> str:
    """The inverse of parse_metadata: {"role": "web"} -> "role=web"."""
    return ",".join(f"{key}={value}" for key, value in metadata.items())


def short_machine_id(machine_id: str) -> str:
    """A machine id as fleetctl shows it: its first 8 characters and "..." (the whole if that short)."""
    return machine_id if len(machine_id) <= SHORT_ID else f"{machine_id[:SHORT_ID]}..."


def machine_id_prefix(machine_id: str) -> str:
    """A machine id as events name it, in messages and columns: its first 8 characters."""
    return machine_id[:SHORT_ID]


# Sizes as systemd reads MemoryMax= (base 1024; a fraction such as 1.5G is allowed), so a
# unit's MemoryMax=, its MemoryRequest= and a machine's configured capacity read alike.
_SIZE_FACTOR = {
    "": 1,
    "B": 1,
    "K": 1024,
    "M": 1024**2,
    "G": 1024**3,
    "T": 1024**4,
    "P": 1024**5,
    "E": 1024**6,
}
_SIZE = re.compile(rf"({_NUMBER})\s*([KMGTPE]?)(?:i?B)?", re.IGNORECASE)
_CPUS = re.compile(rf"({_NUMBER})(%?)")


def parse_bytes(value: str) -> int:
    """Bytes in a size written as systemd writes one: 512M, 1.5G, 2048 (bytes)."""
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise BadValue(f"bad size {value!r}: use bytes (1073741824) or K, M, G or T (512M, 1.5G)")
    number, unit = match.groups()
    return int(float(number) * _SIZE_FACTOR[unit.upper()])


def format_bytes(size: float) -> str:
    """A size for people: 2 GiB, 1.2 GiB, 512 MiB."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(size) >= factor:
            return f"{size / factor:.1f}".removesuffix(".0") + f" {unit}"
    return f"{size:.0f} B"


def parse_cpus(value: str) -> float:
    """CPUs as a number (1.5) or as systemd's CPUQuota= writes them (150% is 1.5 CPUs)."""
    match = _CPUS.fullmatch(value.strip())
    if match is None:
        raise BadValue(f"bad CPU amount {value!r}: use CPUs (1.5) or a percentage of one CPU (150%)")
    number, percent = match.groups()
    return float(number) / 100 if percent else float(number)


def format_cpus(cpus: float) -> str:
    return f"{cpus:.2f}".rstrip("0").rstrip(".") + (" CPU" if cpus == 1 else " CPUs")


CAPACITY_KEYS = ("cpus", "memory", "disk")


def parse_capacity(value: str) -> dict[str, float]:
    """`cpus=2,memory=4G,disk=100G` -> {"cpus": 2.0, "memory": 4294967296.0, ...}: what a machine
    offers units, where it should not be read from the host."""
    capacity = {}
    for key, amount in parse_metadata(value).items():
        if key not in CAPACITY_KEYS:
            raise BadValue(f"bad capacity {key!r}: use {', '.join(CAPACITY_KEYS)}, e.g. cpus=2,memory=4G")
        capacity[key] = parse_cpus(amount) if key == "cpus" else float(parse_bytes(amount))
    return capacity


def parse_shared_volume_dir(value: str) -> str:
    """Where shared volumes live: an absolute path (every machine mounts the storage at its own
    path, and fleetd's working directory means nothing there), or "" for none."""
    text = value.strip().strip('"')
    if text and not text.startswith("/"):
        raise BadValue(
            f"shared_volume_dir {value!r} must be an absolute path, where this machine mounts the "
            "shared storage, e.g. /mnt/fleet-volumes"
        )
    return text
