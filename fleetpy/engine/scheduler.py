"""The pure scheduling core: decide which machine runs which unit, and say why.

No I/O here: the engine hands in the live machines, the submitted jobs with their parsed units
and the current schedule, and gets back a complete desired schedule (a `Plan`) plus, for every
unit, the reasoning `fleetctl` can show.

Placement is a small pipeline in the manner of Nomad's feasibility/rank iterators and the
Kubernetes filter/score plugins: every filter answers one question about one machine and
returns a `Reason` when the answer is no; rankers score the machines that survive. Reasons are
data (a code and its arguments), rendered to text only where a person reads them.

The pipeline is the definition; the plan reaches the same answer without running it over every
machine for every unit: machines are indexed by metadata, units by the Conflicts patterns that
match them, MachineOf targets are looked up, and the least-loaded machine comes from a heap. The
full per-machine pipeline runs only for the units being explained (`plan(..., detail=...)`) and
for units that fit nowhere, whose reason summarises it.

Semantics, following fleet (Documentation/unit-files-and-scheduling.md and its engine):

- Jobs whose desired state is "inactive" are not scheduled; every other job's assignment
  carries the job's hash and desired state, so launched -> loaded only updates it in place.
- A unit already assigned to a live machine that still passes every filter stays there.
  Units on machines that went away, or whose placement became infeasible, are placed again.
- Order: kept units first (they count toward load), then global units, then the rest by name,
  except that a MachineOf follower comes after its target and a replacing unit before the
  unit it replaces.
- MachineID= needs the full machine ID, as fleet's documentation says.
- MachineMetadata: different keys must all match; several values of one key are alternatives.
- Conflicts bind both ways: a unit cannot go where a unit matching its globs is, nor where a
  unit whose globs match it is.
- MachineOf=X: only the machine X is on; while X is unplaced the follower waits, and a
  follower is kept only while it is still with X. MachineOf cycles are never schedulable.
- Global=true: one assignment on every machine passing MachineMetadata and Conflicts (fleet
  rejects the other options alongside Global). Globals count toward a machine's load, as in
  fleet's engine: they run there like any other unit.
- Replaces=X: the unit prefers X's machine and X may no longer run beside it, so X is moved
  elsewhere in the same plan. If X is not placed the unit is placed like any other. Two units
  replacing each other cancel out, as in fleet.

fleetpy's own rules (issue 13; neutral for units that use none of them):

- MemoryRequest/CPURequest (or the unit's MemoryMax=/CPUQuota=): a machine takes a unit only
  while the requests of the units placed there fit in its advertised capacity, so nothing is
  overcommitted; a machine that advertises no capacity takes no unit that requests some.
- MachineConstraint: every constraint must hold on the machine's facts and metadata when the
  unit is placed; a placed unit is not moved when a fact changes afterwards (a unit raising its
  machine's load must not push itself away).
- Volume=NAME: once an agent made the volume, the unit goes only to the machine it lives on;
  while that machine is gone the unit is pending (its data is there) until the volume is
  forgotten. While the volume moves (`fleetctl volume move`) the unit runs nowhere.
  Volume=NAME:shared pins nothing: the unit goes only to machines whose fleetd has a
  shared volume directory (Machine.shared_volumes).
- HealthCheckMoveAfter: a machine where the unit's health check failed after that many
  restarts is avoided (fleetpy.engine.health records it): the unit leaves it and never comes
  back with the same content; with every machine avoided it is pending.
- Strategy=spread (the default) ranks by fleet's least-loaded; binpack ranks by how full the
  machine is: the mean share in use of the resources the unit requests, else its unit count.
"""

from __future__ import annotations

import bisect
import gc
import heapq
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from fleetpy.conf.values import format_bytes, format_cpus, short_machine_id
from fleetpy.engine.cordon import drained
from fleetpy.registry.models import Assignment, Job, Machine
from fleetpy.unit.glob import glob_match

if TYPE_CHECKING:
    from fleetpy.unit import Unit

_NONE: Mapping = MappingProxyType({})


# --- reasons ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reason:
    """Why a machine was excluded, why a unit went where it went, or why it went nowhere.

    `code` names the rule and `args` its data; `str()` renders it for people (see _RENDER).
    """

    code: str
    args: tuple = ()

    def __str__(self) -> str:
        return _RENDER[self.code](*self.args)


def _metadata_text(wanted: tuple[tuple[str, tuple[str, ...]], ...]) -> str:
    return ",".join(f"{key}={'|'.join(values)}" for key, values in wanted)


def _no_fit_text(machine_count: int, groups: tuple[tuple[Reason, int], ...]) -> str:
    if len(groups) == 1:
        ((reason, _),) = groups
        where = "the only machine" if machine_count == 1 else f"all {machine_count} machines"
        return f"no machine fits: {reason} on {where}"
    return f"0/{machine_count} machines fit: " + ", ".join(f"{n} {reason}" for reason, n in groups)


def _load_text(load: int) -> str:
    return f"least loaded ({load} unit{'' if load == 1 else 's'})"


def _amount(resource: str, amount: float) -> str:
    return format_bytes(amount) if resource == "memory" else format_cpus(amount)


def _short_text(*short: tuple[str, float, float]) -> str:
    return "; ".join(
        f"not enough {r} (needs {_amount(r, need)}, {_amount(r, free)} free)" for r, need, free in short
    )


def _best_free_text(*short: tuple[str, float, float]) -> str:
    return "; ".join(
        f"not enough {r} (needs {_amount(r, need)}, the best has {_amount(r, free)} free)"
        for r, need, free in short
    )


def _constraint_text(text: str, key: str = "", actual: object = None) -> str:
    if isinstance(actual, float) and actual.is_integer():
        actual = int(actual)
    if not key:
        return f"{text} does not hold"
    return (
        f"{text} does not hold ({key} is {actual})"
        if actual is not None
        else f"{text} does not hold (no {key})"
    )


def _unhealthy_text(machine_id: str = "", restarts: int = 0) -> str:
    if not machine_id:  # a pending summary's: the machines differ
        return "its health check failed there (new content or a destroy and submit clears this)"
    return f"failed its health check on {short_machine_id(machine_id)} after {restarts} restarts"


_RENDER: dict[str, Callable[..., str]] = {
    # Filters: why one machine is out.
    "machine-id": lambda wanted: f"MachineID is {short_machine_id(wanted)}",
    "metadata": lambda wanted: f"metadata {_metadata_text(wanted)} does not match",
    "machine-of": lambda target: f"not the machine of {target}",
    "conflict": lambda *units: f"conflicts with {', '.join(units)}",
    "replaced-by": lambda *units: f"replaced by {', '.join(units)}",
    "drained": lambda: "machine is drained",
    "unhealthy": _unhealthy_text,
    "resources": _short_text,
    "no-capacity": lambda resource: f"advertises no {resource} capacity",
    "constraint": _constraint_text,
    "volume": lambda name, home, live: (
        f"volume {name} lives on {short_machine_id(home)}"
        + (
            ""
            if live
            else f", a machine that is gone ('fleetctl volume rm {name}' starts it afresh elsewhere)"
        )
    ),
    "shared-volume": lambda name: (
        f"volume {name} is shared; no shared volume directory here (fleetd --shared-volume-dir)"
    ),
    # Choices: why this machine.
    "kept": lambda: "kept where it runs",
    "replaces": lambda *units: f"replaces {', '.join(units)} there",
    "only-fit": lambda: "only machine that fits",
    "least-loaded": _load_text,
    "binpack": lambda percent: f"fullest that fits ({percent}% used)",
    "most-loaded": lambda load: f"most loaded ({load} unit{'' if load == 1 else 's'})",
    "global": lambda chosen, total: f"global: on {chosen} of {total} machines",
    # Pending: why no machine.
    "no-machines": lambda: "no machines registered",
    "cycle": lambda *path: "MachineOf cycle: " + " -> ".join(path),
    "waiting": lambda target: f"waiting for {target} to be scheduled",
    "no-fit": _no_fit_text,
    "moving": lambda name, source, target: (
        f"volume {name} is moving from {short_machine_id(source)} to {short_machine_id(target)}"
    ),
    # A pending summary's: every machine short of resources, with the most any had free.
    "best-free": _best_free_text,
}
# Reasons that name other units: a pending summary lists those names together.
_NAMING = frozenset({"conflict", "replaced-by"})


@dataclass(frozen=True)
class Decision:
    """Why a unit went where it went, or why it went nowhere.

    `filtered` (every excluded machine with its reason) and `scores` (every candidate) are
    recorded only for the units a plan was asked to detail; for the others, `filtered` holds
    just the machines their health check failed on.
    """

    unit: str
    machine_id: str | None
    reason: Reason
    filtered: Mapping[str, Reason] = field(default_factory=dict)
    scores: Mapping[str, float] = field(default_factory=dict)
    kept: bool = False


@dataclass(frozen=True)
class Plan:
    """The complete desired schedule, and what could not be scheduled."""

    assignments: tuple[Assignment, ...]
    pending: Mapping[str, Reason]
    decisions: Mapping[str, Decision]


# --- indexes ---------------------------------------------------------------------------------


class Replacements:
    """Who replaces whom: the one home of the Replaces rule.

    Only submitted units count, and two units replacing each other cancel out (both would move
    forever), as in fleet.
    """

    def __init__(self, units: Mapping[str, Unit]):
        self._of: dict[str, frozenset[str]] = {}
        self._by: dict[str, set[str]] = {}
        names = sorted(units)
        for name, unit in units.items():
            # Replaces= holds globs, as fleet's agent matched them.
            replaced = frozenset(
                other
                for pattern in unit.fleet.replaces
                for other in _matches(pattern, names)
                if other != name and not units[other].fleet.replaces_unit(name)
            )
            if replaced:
                self._of[name] = replaced
                for other in replaced:
                    self._by.setdefault(other, set()).add(name)

    def of(self, replacer: str) -> frozenset[str]:
        """The units `replacer` displaces."""
        return self._of.get(replacer, frozenset())

    def by(self, replaced: str) -> Collection[str]:
        """The units that displace `replaced`."""
        return self._by.get(replaced, ())


class Conflicts:
    """Units grouped by the Conflicts patterns that match them, and where those units are.

    For every pattern some unit states: its holders, the units it matches (found with the unit
    module's own matcher), and per machine the placed holders and placed matches, so "does
    anything here conflict with this unit" is a few dictionary lookups.
    """

    def __init__(self, units: Mapping[str, Unit]):
        self.patterns: dict[str, tuple[str, ...]] = {
            n: u.fleet.conflicts for n, u in units.items() if u.fleet.conflicts
        }
        self.matched_by: dict[str, list[str]] = {}
        names = sorted(units)
        for pattern in {p for patterns in self.patterns.values() for p in patterns}:
            for name in _matches(pattern, names):
                self.matched_by.setdefault(name, []).append(pattern)
        # Units ruled out of exactly the same machines share a class (and a heap, when many do).
        self.class_of: dict[str, tuple] = {
            name: (self.patterns.get(name, ()), tuple(sorted(self.matched_by.get(name, ()))))
            for name in self.patterns.keys() | self.matched_by.keys()
        }
        self.class_size = Counter(self.class_of.values())
        self._holders_on: dict[str, dict[str, set[str]]] = {}
        self._matches_on: dict[str, dict[str, set[str]]] = {}

    def place(self, name: str, machine_id: str) -> None:
        for pattern in self.patterns.get(name, ()):
            self._holders_on.setdefault(pattern, {}).setdefault(machine_id, set()).add(name)
        for pattern in self.matched_by.get(name, ()):
            self._matches_on.setdefault(pattern, {}).setdefault(machine_id, set()).add(name)

    def remove(self, name: str, machine_id: str) -> None:
        for pattern in self.patterns.get(name, ()):
            self._holders_on[pattern][machine_id].discard(name)
        for pattern in self.matched_by.get(name, ()):
            self._matches_on[pattern][machine_id].discard(name)

    def on(self, name: str, machine_id: str) -> Iterable[str]:
        """The units on `machine_id` that conflict with `name`, either way (may repeat)."""
        for pattern in self.patterns.get(name, ()):
            yield from self._matches_on.get(pattern, _NONE).get(machine_id, ())
        for pattern in self.matched_by.get(name, ()):
            yield from self._holders_on.get(pattern, _NONE).get(machine_id, ())

    def involves(self, name: str) -> bool:
        """Whether `name` states Conflicts or some unit's Conflicts match it."""
        return name in self.patterns or name in self.matched_by

    def any_on(self, name: str, machine_id: str) -> bool:
        """Whether a unit on `machine_id` other than `name` conflicts with it."""
        return any(other != name for other in self.on(name, machine_id))

    def hosts(self, name: str) -> set[str]:
        """Every machine holding a unit that conflicts with `name` (or `name` itself)."""
        machines: set[str] = set()
        for pattern in self.patterns.get(name, ()):
            machines.update(m for m, here in self._matches_on.get(pattern, _NONE).items() if here)
        for pattern in self.matched_by.get(name, ()):
            machines.update(m for m, here in self._holders_on.get(pattern, _NONE).items() if here)
        return machines


def _matches(pattern: str, names: list[str]) -> list[str]:
    """The sorted `names` that `pattern` matches, by the unit module's glob matcher.

    Only names starting with the pattern's literal head can match, so just those are tried.
    """
    head = pattern
    for i, char in enumerate(pattern):
        if char in "*?[\\":
            head = pattern[:i]
            break
    found = []
    for name in names[bisect.bisect_left(names, head) :]:
        if not name.startswith(head):
            break
        if glob_match(pattern, name):
            found.append(name)
    return found


class Loads:
    """Machines ordered by (load, id) within each candidate pool, as lazy heaps.

    A load change pushes a fresh entry into every heap holding that machine; entries whose load
    is no longer the machine's are dropped when they surface.
    """

    def __init__(self, machine_ids: Iterable[str]):
        self.load: dict[str, int] = dict.fromkeys(machine_ids, 0)
        self._heaps: dict[object, list[tuple[int, str]]] = {}
        self._heaps_of: dict[str, list[list[tuple[int, str]]]] = {mid: [] for mid in self.load}

    def pool(self, key: object, members: Callable[[], Iterable[str]]) -> list[tuple[int, str]]:
        heap = self._heaps.get(key)
        if heap is None:
            heap = [(self.load[mid], mid) for mid in members()]
            heapq.heapify(heap)
            self._heaps[key] = heap
            for _, mid in heap:
                self._heaps_of[mid].append(heap)
        return heap

    def change(self, machine_id: str, delta: int) -> None:
        self.load[machine_id] += delta
        entry = (self.load[machine_id], machine_id)
        for heap in self._heaps_of[machine_id]:
            heapq.heappush(heap, entry)

    def lightest(
        self,
        heap: list[tuple[int, str]],
        excluded: Callable[[str], bool] | None,
        count: int,
        drop_excluded: bool = False,
    ) -> list[str]:
        """Up to `count` machines of the pool, least loaded first, skipping `excluded` ones.

        A heap that serves one class of units may `drop_excluded` entries for good: only a
        change of what runs on a machine can change that, and it pushes a fresh entry.
        """
        found: list[str] = []
        popped: list[tuple[int, str]] = []
        seen: set[str] = set()
        while heap and len(found) < count:
            entry = heapq.heappop(heap)
            load, mid = entry
            if load != self.load[mid] or mid in seen:
                continue
            seen.add(mid)
            if excluded is None or not excluded(mid):
                found.append(mid)
            elif drop_excluded:
                continue
            popped.append(entry)
        for entry in popped:
            heapq.heappush(heap, entry)
        return found


class Fullness:
    """Machines ordered fullest first within each candidate pool, for binpack, as lazy heaps.

    Like `Loads`, but a heap's order is the share in use of a set of resources (the ones its
    units request), or the unit count for units that request none. A machine left with less of
    a resource than any of the heap's units requests is dropped from it until a unit leaves it.
    """

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self._heaps: dict[object, list[tuple[float, str]]] = {}
        self._heaps_of: dict[str, list[tuple[tuple[str, ...], list[tuple[float, str]]]]] = {
            mid: [] for mid in ctx.machines
        }
        self._least: dict[tuple[str, ...], dict[str, float]] = {}

    def pool(
        self, key: object, resources: tuple[str, ...], members: Callable[[], Iterable[str]]
    ) -> list[tuple[float, str]]:
        heap = self._heaps.get(key)
        if heap is None:
            heap = [(-_share(self.ctx, resources, mid), mid) for mid in members()]
            heapq.heapify(heap)
            self._heaps[key] = heap
            for _, mid in heap:
                self._heaps_of[mid].append((resources, heap))
        return heap

    def change(self, machine_id: str) -> None:
        for resources, heap in self._heaps_of[machine_id]:
            heapq.heappush(heap, (-_share(self.ctx, resources, machine_id), machine_id))

    def fullest(
        self,
        heap: list[tuple[float, str]],
        resources: tuple[str, ...],
        excluded: Callable[[str], bool] | None,
    ) -> list[str]:
        """Up to two machines of the pool, fullest first, skipping `excluded` ones."""
        found: list[str] = []
        popped: list[tuple[float, str]] = []
        seen: set[str] = set()
        while heap and len(found) < 2:
            entry = heapq.heappop(heap)
            share, mid = entry
            if share != -_share(self.ctx, resources, mid) or mid in seen:
                continue
            seen.add(mid)
            if excluded is None or not excluded(mid):
                found.append(mid)
            elif self._full(resources, mid):
                continue
            popped.append(entry)
        for entry in popped:
            heapq.heappush(heap, entry)
        return found

    def _full(self, resources: tuple[str, ...], machine_id: str) -> bool:
        """Whether no binpacked unit requesting `resources` could fit on the machine now."""
        if resources not in self._least:
            least: dict[str, float] = {}
            for unit in self.ctx.units.values():
                if unit.fleet.strategy == "binpack" and _requested(unit) == resources:
                    for resource in resources:
                        need = _request(unit, resource)
                        least[resource] = min(need, least.get(resource, need))
            self._least[resources] = least
        for resource, need in self._least[resources].items():
            free = self.ctx.free(machine_id, resource)
            if free is None or need > free + _SLACK:
                return True
        return False


def _requested(unit: Unit) -> tuple[str, ...]:
    """The resources a unit requests, in a fixed order."""
    fleet = unit.fleet
    return tuple(r for r, need in (("cpus", fleet.cpu_request), ("memory", fleet.memory_request)) if need)


def _request(unit: Unit, resource: str) -> float:
    return unit.fleet.cpu_request if resource == "cpus" else unit.fleet.memory_request


def _share(ctx: Context, resources: tuple[str, ...], machine_id: str) -> float:
    """How full a machine is, in [0, 1]: the mean share in use of `resources`, or by unit count
    when there are none. A machine that does not advertise one counts as full of it."""
    if not resources:
        load = ctx.load(machine_id)
        return load / (1 + load)
    total = 0.0
    for resource in resources:
        capacity = ctx.machines[machine_id].capacity.get(resource)
        total += min(ctx.used[machine_id][resource] / capacity, 1.0) if capacity else 1.0
    return total / len(resources)


class Context:
    """The schedule as it is being built; filters and rankers read it, `plan` writes it."""

    def __init__(
        self,
        machines: Mapping[str, Machine],
        units: Mapping[str, Unit],
        volumes: Mapping[str, str] = _NONE,
        avoided: Mapping[str, Mapping[str, int]] = _NONE,
        moving: Mapping[str, tuple[str, str]] = _NONE,
    ):
        self.machines = machines
        self.units = units
        self.volumes = volumes  # volume name -> the machine it lives on
        self.moving = moving  # volume name -> (source, target) of its move under way
        # unit -> the machines its health check failed on -> the restarts it had there
        self.avoided = avoided
        self.cycles = _machine_of_cycles(units)
        self.on_machine: dict[str, set[str]] = {mid: set() for mid in machines}
        self.placed: dict[str, set[str]] = {}
        self.replacements = Replacements(units)
        self.conflicts = Conflicts(units)
        self.loads = Loads(machines)
        # Machines that take new units: all but drained ones (globals stay on those).
        self.open = {mid for mid, machine in machines.items() if not drained(machine)}
        # Machines that can run units with a shared volume.
        self.shared = {mid for mid, machine in machines.items() if machine.shared_volumes}
        # metadata key -> value -> machines with it
        self._by_metadata: dict[str, dict[str, set[str]]] = {}
        for mid, machine in machines.items():
            for key, value in machine.metadata.items():
                self._by_metadata.setdefault(key, {}).setdefault(value, set()).add(mid)
        # What the units placed on each machine reserve: {"cpus": ..., "memory": ...}.
        self.used: dict[str, dict[str, float]] = {mid: {"cpus": 0.0, "memory": 0.0} for mid in machines}
        self._attributes: dict[str, dict[str, str | float]] = {}
        self._constrained: dict[tuple, set[str]] = {}
        self.fullness = Fullness(self)

    def place(self, name: str, machine_id: str) -> None:
        self.on_machine[machine_id].add(name)
        self.placed.setdefault(name, set()).add(machine_id)
        self.conflicts.place(name, machine_id)
        self.reserve(name, machine_id, 1)
        self.loads.change(machine_id, 1)
        self.fullness.change(machine_id)

    def remove(self, name: str) -> None:
        for machine_id in self.placed.pop(name, ()):
            self.on_machine[machine_id].discard(name)
            self.conflicts.remove(name, machine_id)
            self.reserve(name, machine_id, -1)
            self.loads.change(machine_id, -1)
            self.fullness.change(machine_id)

    def reserve(self, name: str, machine_id: str, sign: int) -> None:
        """Count (sign 1) or stop counting (-1) what `name` reserves on the machine."""
        fleet = self.units[name].fleet
        if fleet.memory_request or fleet.cpu_request:
            used = self.used[machine_id]
            used["memory"] += sign * fleet.memory_request
            used["cpus"] += sign * fleet.cpu_request

    def free(self, machine_id: str, resource: str) -> float | None:
        """What is left of `resource` on the machine, or None when it advertises none."""
        capacity = self.machines[machine_id].capacity.get(resource)
        return None if capacity is None else capacity - self.used[machine_id][resource]

    def free_for(self, unit: Unit, machine_id: str, resource: str) -> float | None:
        """What `unit` may take of `resource` there: what is left, and what the units it
        replaces on that machine hold (they leave it when it comes)."""
        free = self.free(machine_id, resource)
        if free is None:
            return None
        replaced = self.replacements.of(unit.name.full)
        if replaced:
            free += sum(_request(self.units[r], resource) for r in replaced & self.on_machine[machine_id])
        return free

    def fits(self, unit: Unit, machine_id: str) -> bool:
        fleet = unit.fleet
        for resource, need in (("memory", fleet.memory_request), ("cpus", fleet.cpu_request)):
            if need:
                free = self.free_for(unit, machine_id, resource)
                if free is None or need > free + _SLACK:
                    return False
        return True

    def attributes(self, machine_id: str) -> dict[str, str | float]:
        if machine_id not in self._attributes:
            self._attributes[machine_id] = self.machines[machine_id].attributes()
        return self._attributes[machine_id]

    def with_constraints(self, constraints: tuple) -> set[str]:
        """Machines whose facts and metadata satisfy every constraint (all machines for none).

        Cached: callers combine it into new sets and never change it.
        """
        if constraints not in self._constrained:
            self._constrained[constraints] = {
                mid
                for mid in self.machines
                if all(c.holds(self.attributes(mid).get(c.key)) for c in constraints)
            }
        return self._constrained[constraints]

    def load(self, machine_id: str) -> int:
        return self.loads.load[machine_id]

    def with_metadata(self, wanted: tuple[tuple[str, frozenset[str]], ...]) -> set[str]:
        """Machines whose metadata satisfies `wanted` (every key, any of its values)."""
        matching: set[str] | None = None
        for key, values in wanted:
            by_value = self._by_metadata.get(key, _NONE)
            some = set().union(*(by_value.get(v, ()) for v in values))
            matching = some if matching is None else matching & some
        return set(self.machines) if matching is None else matching


# Requests are sums of floats: a unit asking exactly what is left must fit.
_SLACK = 1e-9

Filter = Callable[[Context, "Unit", Machine], "Reason | None"]
Ranker = Callable[[Context, "Unit", Machine], float]


# --- filters: None when the machine is feasible, else the reason -----------------------------


def machine_id_filter(ctx: Context, unit: Unit, machine: Machine) -> Reason | None:
    wanted = unit.fleet.machine_id
    if wanted is not None and wanted != machine.id:
        return Reason("machine-id", (wanted,))
    return None


def metadata_filter(ctx: Context, unit: Unit, machine: Machine) -> Reason | None:
    if unit.fleet.metadata_matches(machine.metadata):
        return None
    wanted = tuple((key, tuple(sorted(values))) for key, values in sorted(unit.fleet.machine_metadata))
    return Reason("metadata", (wanted,))


def machine_of_filter(ctx: Context, unit: Unit, machine: Machine) -> Reason | None:
    for target in unit.fleet.machine_of:
        if target not in ctx.on_machine[machine.id]:
            return Reason("machine-of", (target,))
    return None


def conflicts_filter(ctx: Context, unit: Unit, machine: Machine) -> Reason | None:
    name = unit.name.full
    other = min((o for o in ctx.conflicts.on(name, machine.id) if o != name), default=None)
    return None if other is None else Reason("conflict", (other,))


def replaced_filter(ctx: Context, unit: Unit, machine: Machine) -> Reason | None:
    here = ctx.on_machine[machine.id]
    other = min((r for r in ctx.replacements.by(unit.name.full) if r in here), default=None)
    return None if other is None else Reason("replaced-by", (other,))


def cordon_filter(ctx: Context, unit: Unit, machine: Machine) -> Reason | None:
    return None if machine.id in ctx.open else Reason("drained")


def constraint_filter(ctx: Context, unit: Unit, machine: Machine) -> Reason | None:
    if not unit.fleet.constraints:
        return None
    attributes = ctx.attributes(machine.id)
    broken = unit.fleet.failed_constraint(attributes)
    if broken is None:
        return None
    return Reason("constraint", (str(broken), broken.key, attributes.get(broken.key)))


def volume_filter(ctx: Context, unit: Unit, machine: Machine) -> Reason | None:
    for name in unit.fleet.volumes:
        home = ctx.volumes.get(name, machine.id)
        if home != machine.id:
            return Reason("volume", (name, home, home in ctx.machines))
    return None


def health_filter(ctx: Context, unit: Unit, machine: Machine) -> Reason | None:
    restarts = ctx.avoided.get(unit.name.full, _NONE).get(machine.id)
    return None if restarts is None else Reason("unhealthy", (machine.id, restarts))


def shared_volume_filter(ctx: Context, unit: Unit, machine: Machine) -> Reason | None:
    shared = unit.fleet.shared_volumes
    return Reason("shared-volume", (shared[0],)) if shared and not machine.shared_volumes else None


def resources_filter(ctx: Context, unit: Unit, machine: Machine) -> Reason | None:
    fleet = unit.fleet
    short = []
    for resource, need in (("memory", fleet.memory_request), ("cpus", fleet.cpu_request)):
        if need:
            free = ctx.free_for(unit, machine.id, resource)
            if free is None:
                return Reason("no-capacity", (resource,))
            if need > free + _SLACK:
                short.append((resource, need, free))
    return Reason("resources", tuple(short)) if short else None


FILTERS: tuple[Filter, ...] = (
    machine_id_filter,
    metadata_filter,
    machine_of_filter,
    conflicts_filter,
    replaced_filter,
    cordon_filter,
    constraint_filter,
    volume_filter,
    health_filter,
    shared_volume_filter,
    resources_filter,
)
# A unit stays where it runs while these pass: constraints are checked only when it is placed.
KEEP_FILTERS: tuple[Filter, ...] = tuple(f for f in FILTERS if f is not constraint_filter)
# fleet refuses MachineID, MachineOf and Replaces beside Global=true.
GLOBAL_FILTERS: tuple[Filter, ...] = (metadata_filter, conflicts_filter, constraint_filter, resources_filter)


# --- rankers: higher is better, each in [0, 1] -----------------------------------------------


def strategy_ranker(ctx: Context, unit: Unit, machine: Machine) -> float:
    """spread: fleet's least loaded; binpack: the fullest machine (see _share)."""
    if unit.fleet.strategy == "binpack":
        return _share(ctx, _requested(unit), machine.id)
    return 1.0 / (1 + ctx.load(machine.id))


def replaces_ranker(ctx: Context, unit: Unit, machine: Machine) -> float:
    return 1.0 if ctx.replacements.of(unit.name.full) & ctx.on_machine[machine.id] else 0.0


# Weights: the replaced unit's machine beats any difference in load.
RANKERS: tuple[tuple[Ranker, float], ...] = ((strategy_ranker, 1.0), (replaces_ranker, 2.0))


# --- the plan --------------------------------------------------------------------------------


def plan(
    machines: Sequence[Machine],
    jobs: Sequence[tuple[Job, Unit]],
    current: Sequence[Assignment],
    detail: Collection[str] = (),
    volumes: Mapping[str, str] = _NONE,
    avoided: Mapping[str, Mapping[str, int]] = _NONE,
    moving: Mapping[str, tuple[str, str]] = _NONE,
) -> Plan:
    """Compute the complete desired schedule from the cluster as it is now.

    The decisions of the units named in `detail` carry every filter and rank step; `volumes`
    says which machine each recorded volume lives on, `avoided` which machines each unit's
    health check failed on (with the restarts it had there), and `moving` which volumes are
    moving (from, to): their units run nowhere until the move ends.
    """
    # A plan makes many objects and frees few until it returns; the cyclic collector, run
    # every few hundred of them, scanned the caller's long-lived ones (every parsed unit) each
    # time, and made large plans 1.5-4x slower and superlinear. Nothing here makes cycles.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _plan(machines, jobs, current, detail, volumes, avoided, moving)
    finally:
        if collecting:
            gc.enable()


def _plan(
    machines: Sequence[Machine],
    jobs: Sequence[tuple[Job, Unit]],
    current: Sequence[Assignment],
    detail: Collection[str],
    volumes: Mapping[str, str],
    avoided: Mapping[str, Mapping[str, int]],
    moving: Mapping[str, tuple[str, str]] = _NONE,
) -> Plan:
    active = {job.name: (job, unit) for job, unit in jobs if job.desired_state != "inactive"}
    units = {name: unit for name, (_, unit) in active.items()}
    live = {m.id: m for m in sorted(machines, key=lambda m: m.id)}
    ctx = Context(live, units, volumes, avoided, moving)
    decisions: dict[str, Decision] = {}

    globals_ = sorted(name for name, unit in units.items() if unit.fleet.is_global)
    order = _order({name: unit for name, unit in units.items() if not unit.fleet.is_global}, ctx.replacements)
    was_on = _current_machines(current, units, live)

    # A global unit keeps its room where it runs: the units kept below fit beside it or move.
    held_for_globals = [
        (name, mid) for name in globals_ if units[name].fleet.requests for mid in was_on.get(name, ())
    ]
    for name, mid in held_for_globals:
        ctx.reserve(name, mid, 1)

    for name in order:
        # The first machine it may stay on (a unit handing over from a drained one has two).
        keepable = (mid for mid in sorted(was_on.get(name, ())) if _keepable(ctx, units[name], live[mid]))
        machine_id = next(keepable, None)
        if machine_id is not None:
            ctx.place(name, machine_id)
            decisions[name] = Decision(name, machine_id, Reason("kept"), kept=True)

    for name, mid in held_for_globals:
        ctx.reserve(name, mid, -1)
    for name in globals_:
        decisions[name] = _place_global(ctx, units[name], was_on.get(name, set()), name in detail)

    position = {name: i for i, name in enumerate(order)}
    queue = deque(name for name in order if name not in ctx.placed)
    evicted: set[str] = set()
    while queue:
        name = queue.popleft()
        decision = _place_detailed(ctx, units[name]) if name in detail else _place(ctx, units[name])
        decisions[name] = decision
        if decision.machine_id is not None and ctx.replacements.of(name):
            # Globals are not in `order`: one displaced from a machine is not placed again.
            moved = [n for n in _evict_replaced(ctx, name, decision.machine_id, evicted) if n in position]
            queue.extendleft(sorted(moved, key=position.__getitem__, reverse=True))

    pending = {name: decision.reason for name, decision in decisions.items() if name not in ctx.placed}
    assignments = tuple(
        Assignment(
            unit=name, machine_id=mid, hash=active[name][0].hash, desired_state=active[name][0].desired_state
        )
        for name in sorted(ctx.placed)
        for mid in sorted(ctx.placed[name])
    )
    return Plan(
        assignments=assignments, pending=MappingProxyType(pending), decisions=MappingProxyType(decisions)
    )


def _current_machines(
    current: Iterable[Assignment], units: Mapping[str, Unit], live: Mapping[str, Machine]
) -> dict[str, set[str]]:
    # Assignments on machines that went away simply vanish.
    was_on: dict[str, set[str]] = {}
    for a in current:
        if a.unit in units and a.machine_id in live:
            was_on.setdefault(a.unit, set()).add(a.machine_id)
    return was_on


def _keepable(ctx: Context, unit: Unit, machine: Machine) -> bool:
    return _blocked(ctx, unit) is None and all(f(ctx, unit, machine) is None for f in KEEP_FILTERS)


def _blocked(ctx: Context, unit: Unit) -> Reason | None:
    """A reason the unit cannot be placed anywhere yet, whatever the machines."""
    name = unit.name.full
    if name in ctx.cycles:
        return ctx.cycles[name]
    for target in unit.fleet.machine_of:
        if not ctx.placed.get(target):
            return Reason("waiting", (target,))
    for volume in unit.fleet.volumes:
        if volume in ctx.moving:
            return Reason("moving", (volume, *ctx.moving[volume]))
    return None


def _place(ctx: Context, unit: Unit) -> Decision:
    """Place `unit` as `_place_detailed` would, from the indexes instead of every machine."""
    name = unit.name.full
    blocked = _blocked(ctx, unit)
    if blocked is not None:
        return Decision(name, None, blocked)
    excluded = _Exclusions(ctx, name) if ctx.conflicts.involves(name) or ctx.replacements.by(name) else None
    if unit.fleet.requests:
        excluded = _and_not_fitting(ctx, unit, excluded)
    avoided = ctx.avoided.get(name, _NONE)
    if avoided:
        excluded = _and_not_avoided(avoided, excluded)
    pool = _static_pool(ctx, unit)
    fleet = unit.fleet
    if pool is None and fleet.strategy == "spread":
        key, drop = _heap_key(ctx, name, unit)
        heap = ctx.loads.pool(key, lambda: _open_pool(ctx, unit))
        best = ctx.loads.lightest(heap, excluded, 2, drop_excluded=drop)
    elif pool is None:
        resources = _requested(unit)
        heap = ctx.fullness.pool(
            (resources, fleet.machine_metadata, fleet.constraints), resources, lambda: _open_pool(ctx, unit)
        )
        best = ctx.fullness.fullest(heap, resources, excluded)
    else:
        fits = pool if excluded is None else [mid for mid in pool if not excluded(mid)]
        best = heapq.nsmallest(2, fits, key=_rank_key(ctx, unit))
    if not best:
        return Decision(name, None, _no_fit(_filter(ctx, unit, FILTERS), len(ctx.machines)))
    if ctx.replacements.of(name):
        best = _replaced_machine(ctx, unit, pool, excluded) or best
    reason = _choice_reason(ctx, unit, best[0], len(best))
    ctx.place(name, best[0])
    # The machines its health check failed on, so that a move off one says why (events).
    left = {mid: Reason("unhealthy", (mid, n)) for mid, n in avoided.items() if mid in ctx.machines}
    return Decision(name, best[0], reason, filtered=left)


# A class of units this large gets a heap of its own, rather than skipping its exclusions in the
# shared one: all instances of a template that conflict with each other, say.
CLASS_HEAP = 8


def _heap_key(ctx: Context, name: str, unit: Unit) -> tuple[object, bool]:
    """The heap of machines `unit` picks from, and whether that heap may drop the machines the
    unit cannot use for good (when every unit using it is excluded from the same machines)."""
    fleet = unit.fleet
    pool = fleet.machine_metadata if not fleet.constraints else (fleet.machine_metadata, fleet.constraints)
    conflict_class = ctx.conflicts.class_of.get(name)
    if (
        conflict_class is None
        or name in ctx.avoided  # its own exclusions: the class's heap must keep those machines
        or ctx.replacements.by(name)
        or ctx.conflicts.class_size[conflict_class] < CLASS_HEAP
    ):
        return pool, False
    if fleet.requests:
        # Only a unit leaving a machine frees room on it, and that pushes a fresh entry.
        return (pool, conflict_class, fleet.memory_request, fleet.cpu_request), True
    return (pool, conflict_class), True


def _and_not_fitting(
    ctx: Context, unit: Unit, excluded: Callable[[str], bool] | None
) -> Callable[[str], bool]:
    if excluded is None:
        return lambda mid: not ctx.fits(unit, mid)
    return lambda mid: excluded(mid) or not ctx.fits(unit, mid)


def _and_not_avoided(
    avoided: Mapping[str, int], excluded: Callable[[str], bool] | None
) -> Callable[[str], bool]:
    if excluded is None:
        return lambda mid: mid in avoided
    return lambda mid: mid in avoided or excluded(mid)


def _open_pool(ctx: Context, unit: Unit) -> set[str]:
    fleet = unit.fleet
    return ctx.with_metadata(fleet.machine_metadata) & ctx.open & ctx.with_constraints(fleet.constraints)


def _rank_key(ctx: Context, unit: Unit) -> Callable[[str], tuple]:
    """Best machine first, as the strategy ranker orders them, ties by id."""
    if unit.fleet.strategy == "binpack":
        resources = _requested(unit)
        return lambda mid: (-_share(ctx, resources, mid), mid)
    return lambda mid: (ctx.load(mid), mid)


class _Exclusions:
    """Whether Conflicts or Replaces rule a machine out for one unit.

    Asked machine by machine; once many were ruled out, the full set of ruled-out machines is
    cheaper than asking each.
    """

    ASK = 16

    def __init__(self, ctx: Context, name: str):
        self.ctx = ctx
        self.name = name
        self.asked = 0
        self.known: set[str] | None = None

    def __call__(self, machine_id: str) -> bool:
        if self.known is None:
            self.asked += 1
            if self.asked <= self.ASK:
                return self._here(machine_id)
            self.known = self.ctx.conflicts.hosts(self.name)
            for replacer in self.ctx.replacements.by(self.name):
                self.known |= self.ctx.placed.get(replacer, set())
        return machine_id in self.known

    def _here(self, machine_id: str) -> bool:
        if self.ctx.conflicts.any_on(self.name, machine_id):
            return True
        here = self.ctx.on_machine[machine_id]
        return any(r in here for r in self.ctx.replacements.by(self.name))


def _replaced_machine(
    ctx: Context, unit: Unit, pool: set[str] | None, excluded: Callable[[str], bool] | None
) -> list[str]:
    """The least-loaded feasible machine holding a unit `unit` replaces, if any (the
    replaces ranker outweighs any difference in load)."""
    name = unit.name.full
    holding = {mid for r in ctx.replacements.of(name) for mid in ctx.placed.get(r, ())}
    feasible = [
        mid
        for mid in holding
        if (mid in pool if pool is not None else mid in _open_pool(ctx, unit))
        and (excluded is None or not excluded(mid))
    ]
    return [min(feasible, key=_rank_key(ctx, unit))] if feasible else []


def _static_pool(ctx: Context, unit: Unit) -> set[str] | None:
    """The machines MachineID, MachineOf and volumes allow (with the metadata they need), or None
    when none applies and the pool is every machine with the unit's metadata."""
    fleet = unit.fleet
    homes = {ctx.volumes[v] for v in fleet.volumes if v in ctx.volumes}
    if fleet.machine_id is None and not fleet.machine_of and not homes and not fleet.shared_volumes:
        return None
    pool = set(ctx.open) if fleet.machine_id is None else {fleet.machine_id} & ctx.open
    if fleet.shared_volumes:
        pool &= ctx.shared
    for home in homes:
        pool &= {home}
    for target in fleet.machine_of:
        pool &= ctx.placed.get(target, set())
    return {mid for mid in pool if fleet.metadata_matches(ctx.machines[mid].metadata)} & ctx.with_constraints(
        fleet.constraints
    )


def _place_detailed(ctx: Context, unit: Unit) -> Decision:
    """Run every filter over every machine and every ranker over the survivors."""
    name = unit.name.full
    blocked = _blocked(ctx, unit)
    if blocked is not None:
        return Decision(name, None, blocked)
    filtered = _filter(ctx, unit, FILTERS)
    survivors = [m for mid, m in ctx.machines.items() if mid not in filtered]
    if not survivors:
        return Decision(name, None, _no_fit(filtered, len(ctx.machines)), filtered=filtered)
    scores = {m.id: sum(weight * rank(ctx, unit, m) for rank, weight in RANKERS) for m in survivors}
    best = min(scores, key=lambda mid: (-scores[mid], mid))
    reason = _choice_reason(ctx, unit, best, len(survivors))
    ctx.place(name, best)
    return Decision(name, best, reason, filtered=filtered, scores=scores)


def _place_global(ctx: Context, unit: Unit, was_on: set[str], detailed: bool) -> Decision:
    name = unit.name.full
    fleet = unit.fleet
    # Constraints are checked where the unit is not yet, as for any unit.
    matching = ctx.with_metadata(fleet.machine_metadata) & (ctx.with_constraints(fleet.constraints) | was_on)
    conflicted = ctx.conflicts.hosts(name)
    chosen = sorted(
        mid for mid in matching if mid not in conflicted and (not fleet.requests or ctx.fits(unit, mid))
    )
    filtered = _filter(ctx, unit, GLOBAL_FILTERS) if detailed or not chosen else {}
    if not chosen:
        return Decision(
            name, None, _no_fit(filtered, len(ctx.machines)), filtered=filtered if detailed else {}
        )
    for mid in chosen:
        ctx.place(name, mid)
    return Decision(
        name,
        None,
        Reason("global", (len(chosen), len(ctx.machines))),
        filtered=filtered,
        kept=set(chosen) == was_on,
    )


def _filter(ctx: Context, unit: Unit, filters: Sequence[Filter]) -> dict[str, Reason]:
    filtered: dict[str, Reason] = {}
    for mid, machine in ctx.machines.items():
        reason = next((r for f in filters if (r := f(ctx, unit, machine)) is not None), None)
        if reason is not None:
            filtered[mid] = reason
    return filtered


def _choice_reason(ctx: Context, unit: Unit, machine_id: str, candidates: int) -> Reason:
    replaced = sorted(ctx.replacements.of(unit.name.full) & ctx.on_machine[machine_id])
    if replaced:
        return Reason("replaces", tuple(replaced))
    if candidates == 1:
        return Reason("only-fit")
    if unit.fleet.strategy == "binpack":
        if unit.fleet.requests:
            return Reason("binpack", (round(100 * _share(ctx, _requested(unit), machine_id)),))
        return Reason("most-loaded", (ctx.load(machine_id),))
    return Reason("least-loaded", (ctx.load(machine_id),))


def _evict_replaced(ctx: Context, replacer: str, machine_id: str, evicted: set[str]) -> set[str]:
    """Take the units `replacer` displaces off its machine, with their MachineOf followers.

    A unit is displaced at most once so a replacement chain that loops (a -> b -> c -> a)
    cannot move units forever.
    """
    here = ctx.on_machine[machine_id]
    moving = (ctx.replacements.of(replacer) & here) - evicted
    grew = bool(moving)
    while grew:
        followers = {o for o in here - moving if set(ctx.units[o].fleet.machine_of) & moving}
        grew = bool(followers)
        moving |= followers
    for name in moving:
        ctx.remove(name)
    evicted |= moving
    return moving


def _no_fit(filtered: Mapping[str, Reason], machine_count: int) -> Reason:
    """Summarise why no machine fits, as Kubernetes does for a pending pod."""
    if machine_count == 0:
        return Reason("no-machines")
    named: dict[str, set[str]] = {}
    best_free: dict[str, tuple[float, float]] = {}  # resource -> (need, most free anywhere)
    counts: Counter[Reason] = Counter()
    for reason in filtered.values():
        if reason.code in _NAMING:
            named.setdefault(reason.code, set()).update(reason.args)
            reason = Reason(reason.code)
        elif reason.code == "resources":
            for resource, need, free in reason.args:
                best_free[resource] = (need, max(free, best_free.get(resource, (0, free))[1]))
            reason = Reason("best-free")
        elif reason.code == "constraint":
            reason = Reason("constraint", reason.args[:1])
        elif reason.code == "unhealthy":
            reason = Reason("unhealthy")
        counts[reason] += 1
    if best_free:
        short = tuple((r, *best_free[r]) for r in sorted(best_free))
        counts = Counter(
            {(Reason("best-free", short) if r.code == "best-free" else r): n for r, n in counts.items()}
        )
    groups = sorted(
        (
            (Reason(r.code, tuple(sorted(named[r.code]))) if r.code in _NAMING else r, n, str(r))
            for r, n in counts.items()
        ),
        key=lambda group: (-group[1], group[2]),
    )
    return Reason("no-fit", (machine_count, tuple((r, n) for r, n, _ in groups)))


def _machine_of_cycles(units: Mapping[str, Unit]) -> dict[str, Reason]:
    """Units on a MachineOf cycle, each with the cycle spelled out from itself."""
    cycles: dict[str, Reason] = {}
    for start in sorted(name for name, unit in units.items() if unit.fleet.machine_of):
        path = _cycle_through(units, start)
        if path is not None:
            cycles[start] = Reason("cycle", path)
    return cycles


def _cycle_through(units: Mapping[str, Unit], start: str) -> tuple[str, ...] | None:
    stack = [(start, (start,))]
    seen = {start}
    while stack:
        name, path = stack.pop()
        for target in sorted(units[name].fleet.machine_of, reverse=True):
            if target == start:
                return (*path, start)
            if target in units and target not in seen:
                seen.add(target)
                stack.append((target, (*path, target)))
    return None


def _order(units: Mapping[str, Unit], replacements: Replacements) -> list[str]:
    """Names in name order, except targets before followers and replacers before replaced."""
    before: dict[str, set[str]] = {
        name: {t for t in unit.fleet.machine_of if t in units} for name, unit in units.items()
    }
    for name in units:
        for replaced in replacements.of(name):
            if replaced in units:
                before[replaced].add(name)
    waiting = {name: len(deps) for name, deps in before.items()}
    after: dict[str, list[str]] = {name: [] for name in units}
    for name, deps in before.items():
        for dep in deps:
            after[dep].append(name)
    ready = [name for name, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        name = heapq.heappop(ready)
        order.append(name)
        for follower in after[name]:
            waiting[follower] -= 1
            if waiting[follower] == 0:
                heapq.heappush(ready, follower)
    # Units on a cycle never become ready; they still need a decision (pending, mostly).
    return order + sorted(set(units) - set(order))


# --- explaining ------------------------------------------------------------------------------


def explain(decision: Decision) -> list[str]:
    """Human lines for `fleetctl`: where the unit went and why, then each excluded machine."""
    if decision.machine_id is not None:
        head = f"{decision.unit} -> {short_machine_id(decision.machine_id)} : {decision.reason}"
    elif decision.reason.code == "global":
        head = f"{decision.unit} {decision.reason}"
    else:
        head = f"{decision.unit} pending: {decision.reason}"
    lines = [head]
    lines += [
        f"  excluded {short_machine_id(mid)} ({reason})" for mid, reason in sorted(decision.filtered.items())
    ]
    lines += [
        f"  candidate {short_machine_id(mid)} score {score:.2f}"
        for mid, score in sorted(decision.scores.items(), key=lambda s: (-s[1], s[0]))
    ]
    return lines
