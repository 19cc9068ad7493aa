"""Copy a registry from one store to another (etcd v2 -> v3): the durable records only."""

from __future__ import annotations

from dataclasses import dataclass

from fleetpy.registry.registry import Registry
from fleetpy.registry.store import Put

# Durable records. machines/ and engine/leader live under TTLs: each fleetd writes its own
# on the new store when it starts there.
COPIED = ("version", "unit", "job", "machine-metadata", "cordon", "schedule", "pending", "state")


@dataclass(frozen=True)
class Migration:
    copied: int
    unchanged: int


async def migrate(source: Registry, target: Registry) -> Migration:
    """Copy every durable record that `target` lacks or holds differently. Safe to run again:
    a second run copies only what changed since."""
    wanted: dict[str, str] = {}
    for part in COPIED:
        if part == "version":
            version = await source.store.get(source.key("version"))
            if version is not None:
                wanted[target.key("version")] = version
            continue
        for key, value in (await source.store.list(source.key(part))).items():
            wanted[target.prefix + key[len(source.prefix) :]] = value
    present: dict[str, str] = {}
    for part in COPIED:
        if part == "version":
            found = await target.store.get(target.key("version"))
            if found is not None:
                present[target.key("version")] = found
            continue
        present.update(await target.store.list(target.key(part)))
    changed = [Put(key, value) for key, value in sorted(wanted.items()) if present.get(key) != value]
    if changed:
        await target.store.apply(changed)
    return Migration(copied=len(changed), unchanged=len(wanted) - len(changed))
