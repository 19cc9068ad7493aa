"""The scan scheduler fleetpy shipped before the indexed one (commit 7c85d5b), kept as a test oracle.

The indexed scheduler must reach the same plans, reasons and explanations; test_scheduler.py
compares the two on random clusters. Reasons here are the old strings.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from fleetpy.registry.models import Assignment, Job, Machine

if TYPE_CHECKING:
    from fleetpy.unit import Unit

SHORT_ID = 8

# Reasons that name one other unit; a pending summary lists those names together.
_NAMING_REASONS = ("conflicts with ", "replaced by ")


@dataclass(frozen=True)
class Decision:
    """Why a unit went where it went, or why it went nowhere."""

    unit: str
    machine_id: str | None
    filtered: Mapping[str, str] = field(default_factory=dict)
    scores: Mapping[str, float] = field(default_factory=dict)
    kept: bool = False
    # One human phrase: "least loaded (1 unit)", "kept where it runs", the pending reason...
    reason: str = ""


@dataclass(frozen=True)
class Plan:
    """The complete desired schedule, and what could not be scheduled."""

    assignments: tuple[Assignment, ...]
    pending: Mapping[str, str]
    decisions: Mapping[str, Decision]


@dataclass
class Context:
    """The schedule as it is being built; filters and rankers read it, `plan` writes it."""

    machines: Mapping[str, Machine]
    units: Mapping[str, Unit]
    cycles: Mapping[str, str]
    on_machine: dict[str, set[str]]
    placed: dict[str, set[str]]
    # Units that carry Conflicts or Replaces: the only ones the pairwise filters must look at,
    # which keeps a plan near-linear when most units have neither.
    with_conflicts: frozenset[str] = frozenset()
    with_replaces: frozenset[str] = frozenset()

    def place(self, name: str, machine_id: str) -> None:
        self.on_machine[machine_id].add(name)
        self.placed.setdefault(name, set()).add(machine_id)

    def remove(self, name: str) -> None:
        for machine_id in self.placed.pop(name, ()):
            self.on_machine[machine_id].discard(name)

    def load(self, machine_id: str) -> int:
        return len(self.on_machine[machine_id])


Filter = Callable[[Context, "Unit", Machine], "str | None"]
Ranker = Callable[[Context, "Unit", Machine], float]


def short_id(machine_id: str) -> str:
    return machine_id if len(machine_id) <= SHORT_ID else machine_id[:SHORT_ID] + "..."


# --- filters: None when the machine is feasible, else a short reason -----------------------


def machine_id_filter(ctx: Context, unit: Unit, machine: Machine) -> str | None:
    wanted = unit.fleet.machine_id
    if wanted is not None and wanted != machine.id:
        return f"MachineID is {short_id(wanted)}"
    return None


def metadata_filter(ctx: Context, unit: Unit, machine: Machine) -> str | None:
    if unit.fleet.metadata_matches(machine.metadata):
        return None
    wanted = ",".join(
        f"{key}={'|'.join(sorted(values))}" for key, values in sorted(unit.fleet.machine_metadata)
    )
    return f"metadata {wanted} does not match"


def machine_of_filter(ctx: Context, unit: Unit, machine: Machine) -> str | None:
    for target in unit.fleet.machine_of:
        if target not in ctx.on_machine[machine.id]:
            return f"not the machine of {target}"
    return None


def conflicts_filter(ctx: Context, unit: Unit, machine: Machine) -> str | None:
    here = ctx.on_machine[machine.id]
    for other in sorted(here if unit.fleet.conflicts else here & ctx.with_conflicts):
        if other != unit.name.full and _conflict(unit, ctx.units[other]):
            return f"conflicts with {other}"
    return None


def replaced_filter(ctx: Context, unit: Unit, machine: Machine) -> str | None:
    for other in sorted(ctx.on_machine[machine.id] & ctx.with_replaces):
        if _replaces(ctx.units[other], unit):
            return f"replaced by {other}"
    return None


FILTERS: tuple[Filter, ...] = (
    machine_id_filter,
    metadata_filter,
    machine_of_filter,
    conflicts_filter,
    replaced_filter,
)
# fleet refuses MachineID, MachineOf and Replaces beside Global=true.
GLOBAL_FILTERS: tuple[Filter, ...] = (metadata_filter, conflicts_filter)


def _conflict(a: Unit, b: Unit) -> bool:
    return a.fleet.conflicts_with(b.name.full) or b.fleet.conflicts_with(a.name.full)


def _replaces(replacer: Unit, replaced: Unit) -> bool:
    forward = replaced.name.full in replacer.fleet.replaces
    backward = replacer.name.full in replaced.fleet.replaces
    # Mutual replacement would move both units forever; fleet ignores it, so do we.
    return forward and not backward


# --- rankers: higher is better, each in [0, 1] -----------------------------------------------


def least_loaded_ranker(ctx: Context, unit: Unit, machine: Machine) -> float:
    return 1.0 / (1 + ctx.load(machine.id))


def replaces_ranker(ctx: Context, unit: Unit, machine: Machine) -> float:
    if not unit.fleet.replaces:
        return 0.0
    hosts_replaced = any(_replaces(unit, ctx.units[other]) for other in ctx.on_machine[machine.id])
    return 1.0 if hosts_replaced else 0.0


# Weights: the replaced unit's machine beats any difference in load.
RANKERS: tuple[tuple[Ranker, float], ...] = ((least_loaded_ranker, 1.0), (replaces_ranker, 2.0))


# --- the plan --------------------------------------------------------------------------------


def plan(
    machines: Sequence[Machine], jobs: Sequence[tuple[Job, Unit]], current: Sequence[Assignment]
) -> Plan:
    """Compute the complete desired schedule from the cluster as it is now."""
    active = {job.name: (job, unit) for job, unit in jobs if job.desired_state != "inactive"}
    units = {name: unit for name, (_, unit) in active.items()}
    live = {m.id: m for m in sorted(machines, key=lambda m: m.id)}
    ctx = Context(
        machines=live,
        units=units,
        cycles=_machine_of_cycles(units),
        on_machine={mid: set() for mid in live},
        placed={},
        with_conflicts=frozenset(n for n, u in units.items() if u.fleet.conflicts),
        with_replaces=frozenset(n for n, u in units.items() if u.fleet.replaces),
    )
    decisions: dict[str, Decision] = {}
    pending: dict[str, str] = {}

    globals_ = sorted(name for name, unit in units.items() if unit.fleet.is_global)
    order = _order({name: unit for name, unit in units.items() if not unit.fleet.is_global})
    was_on = _current_machines(current, units, live)

    for name in order:
        machine_id = min(was_on.get(name, ()), default=None)
        if machine_id is not None and _keepable(ctx, units[name], live[machine_id]):
            ctx.place(name, machine_id)
            decisions[name] = Decision(name, machine_id, kept=True, reason="kept where it runs")

    for name in globals_:
        decisions[name] = _place_global(ctx, units[name], was_on.get(name, set()))

    queue = deque(name for name in order if name not in ctx.placed)
    evicted: set[str] = set()
    while queue:
        name = queue.popleft()
        decision = _place(ctx, units[name])
        decisions[name] = decision
        if decision.machine_id is not None:
            moved = _evict_replaced(ctx, units[name], decision.machine_id, order, evicted)
            queue.extendleft(reversed(moved))

    for name, decision in decisions.items():
        if name not in ctx.placed:
            pending[name] = decision.reason
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
    return _blocked(ctx, unit) is None and all(f(ctx, unit, machine) is None for f in FILTERS)


def _blocked(ctx: Context, unit: Unit) -> str | None:
    """A reason the unit cannot be placed anywhere yet, whatever the machines."""
    name = unit.name.full
    if name in ctx.cycles:
        return ctx.cycles[name]
    for target in unit.fleet.machine_of:
        if not ctx.placed.get(target):
            return f"waiting for {target} to be scheduled"
    return None


def _place(ctx: Context, unit: Unit) -> Decision:
    name = unit.name.full
    blocked = _blocked(ctx, unit)
    if blocked is not None:
        return Decision(name, None, reason=blocked)
    filtered = _filter(ctx, unit, FILTERS)
    survivors = [m for mid, m in ctx.machines.items() if mid not in filtered]
    if not survivors:
        return Decision(name, None, filtered=filtered, reason=_pending_reason(filtered, len(ctx.machines)))
    scores = {m.id: sum(weight * rank(ctx, unit, m) for rank, weight in RANKERS) for m in survivors}
    best = min(scores, key=lambda mid: (-scores[mid], mid))
    reason = _choice_reason(ctx, unit, ctx.machines[best], len(survivors))
    ctx.place(name, best)
    return Decision(name, best, filtered=filtered, scores=scores, reason=reason)


def _place_global(ctx: Context, unit: Unit, was_on: set[str]) -> Decision:
    name = unit.name.full
    filtered = _filter(ctx, unit, GLOBAL_FILTERS)
    chosen = [mid for mid in ctx.machines if mid not in filtered]
    if not chosen:
        return Decision(name, None, filtered=filtered, reason=_pending_reason(filtered, len(ctx.machines)))
    for mid in chosen:
        ctx.place(name, mid)
    return Decision(
        name,
        None,
        filtered=filtered,
        kept=set(chosen) == was_on,
        reason=f"global: on {len(chosen)} of {len(ctx.machines)} machines",
    )


def _filter(ctx: Context, unit: Unit, filters: Sequence[Filter]) -> dict[str, str]:
    filtered: dict[str, str] = {}
    for mid, machine in ctx.machines.items():
        reason = next((r for f in filters if (r := f(ctx, unit, machine)) is not None), None)
        if reason is not None:
            filtered[mid] = reason
    return filtered


def _choice_reason(ctx: Context, unit: Unit, machine: Machine, candidates: int) -> str:
    replaced = sorted(o for o in ctx.on_machine[machine.id] if _replaces(unit, ctx.units[o]))
    if replaced:
        return f"replaces {', '.join(replaced)} there"
    if candidates == 1:
        return "only machine that fits"
    load = ctx.load(machine.id)
    return f"least loaded ({load} unit{'' if load == 1 else 's'})"


def _evict_replaced(
    ctx: Context, replacer: Unit, machine_id: str, order: Sequence[str], evicted: set[str]
) -> list[str]:
    """Take the units `replacer` displaces off its machine, with their MachineOf followers.

    Returns them in placement order, to be placed again. A unit is displaced at most once so a
    replacement chain that loops (a -> b -> c -> a) cannot move units forever.
    """
    moving = {o for o in ctx.on_machine[machine_id] if o not in evicted and _replaces(replacer, ctx.units[o])}
    grew = True
    while grew:
        followers = {
            o for o in ctx.on_machine[machine_id] - moving if set(ctx.units[o].fleet.machine_of) & moving
        }
        grew = bool(followers)
        moving |= followers
    for name in moving:
        ctx.remove(name)
    evicted |= moving
    return [name for name in order if name in moving]


def _pending_reason(filtered: Mapping[str, str], machine_count: int) -> str:
    """Summarise why no machine fits, as Kubernetes does for a pending pod."""
    if machine_count == 0:
        return "no machines registered"
    groups: dict[str, list[str]] = {}
    counts: Counter[str] = Counter()
    for reason in filtered.values():
        head = next((p for p in _NAMING_REASONS if reason.startswith(p)), reason)
        named = reason[len(head) :] if head != reason else ""
        if named and named not in groups.setdefault(head, []):
            groups[head].append(named)
        counts[head] += 1
    phrases = {head: head + ", ".join(sorted(groups[head])) if groups.get(head) else head for head in counts}
    if len(counts) == 1:
        (head,) = counts
        where = "the only machine" if machine_count == 1 else f"all {machine_count} machines"
        return f"no machine fits: {phrases[head]} on {where}"
    parts = (
        f"{n} {phrases[head]}" for head, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    )
    return f"0/{machine_count} machines fit: {', '.join(parts)}"


def _machine_of_cycles(units: Mapping[str, Unit]) -> dict[str, str]:
    """Units on a MachineOf cycle, each with the cycle spelled out from itself."""
    cycles: dict[str, str] = {}
    for start in sorted(units):
        path = _cycle_through(units, start)
        if path is not None:
            cycles[start] = "MachineOf cycle: " + " -> ".join(path)
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


def _order(units: Mapping[str, Unit]) -> list[str]:
    """Names in name order, except targets before followers and replacers before replaced."""
    before: dict[str, set[str]] = {
        name: {t for t in unit.fleet.machine_of if t in units} for name, unit in units.items()
    }
    for name, unit in units.items():
        for replaced in unit.fleet.replaces:
            if replaced in units and _replaces(unit, units[replaced]):
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
        head = f"{decision.unit} -> {short_id(decision.machine_id)} : {decision.reason}"
    elif decision.reason.startswith("global:"):
        head = f"{decision.unit} {decision.reason}"
    else:
        head = f"{decision.unit} pending: {decision.reason}"
    lines = [head]
    lines += [f"  excluded {short_id(mid)} ({reason})" for mid, reason in sorted(decision.filtered.items())]
    lines += [
        f"  candidate {short_id(mid)} score {score:.2f}"
        for mid, score in sorted(decision.scores.items(), key=lambda s: (-s[1], s[0]))
    ]
    return lines
