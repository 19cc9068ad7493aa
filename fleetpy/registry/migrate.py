"""Copy a registry from one store to another (etcd v2 -> v3): the durable records only."""

from __future__ import annotations

from dataclasses import dataclass

from fleetpy.registry.registry import Registry
from fleetpy.registry.store import Put

# Durable records. machines/ and engine/leader live under TTLs: each fleetd writes its own
# on the new store when it starts there.
COPIED = ("version", "unit", "job", "machine-metadata", "cordon", "schedule", "pending", "avoid", "state")


@dataclass(frozen=True)
class Migration:
    copied: int
    unchanged: int


async def migrate(source: Registry, target: Registry) -> Migration:
    """Copy every durable record that `target` lacks or holds differently. Safe to run again:
    a second run copies only what changed since."""
    wanted = await _durable_records(source)
    present = await _durable_records(target)
    changed = [
        Put(target.prefix + path, value)
        for path, value in sorted(wanted.items())
        if present.get(path) != value
    ]
    if changed:
        await target.store.apply(changed)
    return Migration(copied=len(changed), unchanged=len(wanted) - len(changed))


async def _durable_records(registry: Registry) -> dict[str, str]:
    """`registry`'s durable records, by their path under its prefix."""
    found: dict[str, str] = {}
    for part in COPIED:
        if part == "version":
            version = await registry.store.get(registry.key("version"))
            if version is not None:
                found["version"] = version
            continue
        for key, value in (await registry.store.list(registry.key(part))).items():
            found[key[len(registry.prefix) :]] = value
    return found
