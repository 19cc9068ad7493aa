"""The agent's pure middle step: from desired and current state to the work to do."""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass, field

# States in which a unit counts as running or on its way there: starting it again is pointless.
RUNNING = frozenset({"active", "activating", "reloading"})
# A unit found in one of these was started before: systemd's Restart= decides what comes next.
STARTED = RUNNING | {"failed", "deactivating"}


@dataclass(frozen=True)
class Desired:
    text: str
    desired_state: str  # "loaded" or "launched"


@dataclass
class Tasks:
    """What to do, in the order the agent does it: stop, remove, write, link, start."""

    stop: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    write: dict[str, str] = field(default_factory=dict)
    start: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.stop or self.remove or self.write or self.start)


def plan_tasks(
    desired: Mapping[str, Desired],
    installed: Mapping[str, str],
    active: Mapping[str, str],
    started: Set[str] | None,
) -> Tasks:
    """Compare what the engine assigned with what is on disk and running, and list the work.

    `installed` maps unit files in our unit dir to their text, `active` maps units to systemd's
    ActiveState, `started` names the launched units this agent already started with their
    current content (None on its first pass: then a unit systemd shows running or failed
    counts as started). A unit already installed with the same text and running is left alone:
    this is what lets a restarted fleetd adopt its units without restarting them. A unit
    started before is never started again just because it failed or exited: systemd's
    Restart= decides that, and `fleetctl stop` then `start` (or new content) starts it anew.
    """
    tasks = Tasks()
    for name in sorted(installed.keys() - desired.keys()):
        if active.get(name) in RUNNING:
            tasks.stop.append(name)
        tasks.remove.append(name)
    for name in sorted(desired):
        want = desired[name]
        running = active.get(name) in RUNNING
        changed = installed.get(name) != want.text
        if changed:
            tasks.write[name] = want.text
        if running and (changed or want.desired_state != "launched"):
            # New content only takes effect through a restart.
            tasks.stop.append(name)
        elif active.get(name) == "failed" and want.desired_state != "launched":
            # Stopping clears the failure, so a later start is not read as failing again.
            tasks.stop.append(name)
        was_started = active.get(name) in STARTED if started is None else name in started
        if want.desired_state == "launched" and (changed or not was_started):
            tasks.start.append(name)
    return tasks
