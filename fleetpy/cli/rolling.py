"""`fleetctl rolling-replace`: give a template's running instances new content a batch at a time.

Each batch of instances (at most --max-unavailable) gets the new unit file through fleet's
replace (a PUT with new options); the next batch starts only when every instance of this one
runs the new content, is active and, if it has a health check, healthy. A batch that fails
(the unit fails, its check finds it unhealthy or the agent restarts it, or it takes too long)
stops the run: no further instance is touched and, unless --no-rollback, the instances already
replaced get their old content back the same way, newest first. The template itself takes the
new content only when every instance has it, so `scale` never mixes versions mid-run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import click

import fleetpy.unit as fleet_unit
from fleetpy.client import Client

POLL_INTERVAL = 0.5
# Without a health check, an instance counts as ready once it stayed active this long (as
# fleetctl start watches a started unit for an immediate failure).
SETTLE = 1.0


@dataclass(frozen=True)
class Readiness:
    """Where one replaced instance stands: "waiting", "ready" or "failed" (with why)."""

    verdict: str
    why: str = ""


def readiness(states: list[dict], new_hash: str, has_check: bool, active_for: float) -> Readiness:
    """Judge an instance by its state records (all machines) after it got `new_hash`.

    `active_for` is how long it has been seen active with the new content, for units without a
    health check.
    """
    mine = [s for s in states if s.get("hash") == new_hash]
    if not mine:
        return Readiness("waiting", "no machine runs the new content yet")
    state = mine[0]
    active = state.get("systemdActiveState")
    if active == "failed":
        return Readiness("failed", state.get("reason") or "it failed")
    health = state.get("health")
    if health and (health.get("status") == "unhealthy" or health.get("restarts", 0) > 0):
        said = health.get("message") or "its health check failed"
        return Readiness("failed", f"unhealthy: {said}")
    if active != "active":
        return Readiness("waiting", f"it is {active}")
    if has_check:
        if health and health.get("status") == "healthy":
            return Readiness("ready")
        return Readiness("waiting", "its health check has not passed yet")
    return Readiness("ready") if active_for >= SETTLE else Readiness("waiting", "it just became active")


def batches(names: list[str], size: int) -> list[list[str]]:
    return [names[i : i + size] for i in range(0, len(names), size)]


def instance_order(name: str) -> tuple[int, str]:
    instance = fleet_unit.UnitName.parse(name).instance
    return (int(instance), name) if instance.isdigit() else (1 << 62, name)


class RollingReplace:
    """One run of the command; `echo` prints progress lines."""

    def __init__(
        self,
        client: Client,
        template: str,
        options: list[dict],
        timeout: float,
        legend: Callable[[str], str],
        echo: Callable[[str], None] = click.echo,
    ):
        self.client = client
        self.template = fleet_unit.UnitName.parse(template)
        self.options = options
        self.timeout = timeout
        self.legend = legend
        self.echo = echo
        self.new_hash = fleet_unit.UnitFile.from_options(options).hash

    def instances(self) -> list[dict]:
        found = [
            u
            for u in self.client.units()
            if fleet_unit.UnitName.parse(u["name"]).template == self.template.full
            and u["name"] != self.template.full
        ]
        return sorted(found, key=lambda u: instance_order(u["name"]))

    def run(self, max_unavailable: int, rollback: bool) -> None:
        started = time.monotonic()
        instances = self.instances()
        for unit in instances:  # the door's rules, for every instance, before anything changes
            fleet_unit.load_unit(unit["name"], fleet_unit.UnitFile.from_options(self.options))
        todo = [u for u in instances if _hash(u["options"]) != self.new_hash]
        if not instances:
            raise click.ClickException(
                f"{self.template.full} has no instances; start some first (fleetctl scale {self.template.full}=3)"
            )
        short = self.new_hash[:7]
        self.echo(
            f"Replacing {len(todo)} of {len(instances)} instances of {self.template.full} with {short}, "
            f"{max_unavailable} at a time"
        )
        done: list[dict] = []
        for batch in batches(todo, max_unavailable):
            failure = self._replace(batch, self.options, self.new_hash)
            if failure is not None:
                name, why = failure
                # The failed batch's instances have (some of) the new content too: roll them back.
                replaced = done + batch
                message = f"rolling replace of {self.template.full} stopped at {name}: {why}"
                if not rollback:
                    raise click.ClickException(
                        f"{message}; {len(replaced)} instances run {short} (--no-rollback), "
                        f"{len(todo) - len(replaced)} were not touched"
                    )
                self.echo(f"{name} failed: {why}; rolling back {len(replaced)} instances")
                self._roll_back(replaced, max_unavailable)
                raise click.ClickException(
                    f"{message}; rolled back {len(replaced)} instances to their old content"
                )
            done.extend(batch)
            self.echo(f"{len(done)}/{len(todo)} replaced")
        template = self.client.unit(self.template.full)
        if template is not None and _hash(template["options"]) != self.new_hash:
            self.client.create_unit(self.template.full, "inactive", self.options)
        self.echo(
            f"Replaced {len(todo)} instances of {self.template.full} with {short} in "
            f"{time.monotonic() - started:.1f}s"
        )

    def _replace(
        self, batch: list[dict], options: list[dict], digest: str, rolling_back: bool = False
    ) -> tuple[str, str] | None:
        """Give the batch `options` and wait until it is ready; the first failure, if any."""
        for unit in batch:
            if rolling_back:
                self.echo(f"Rolling back {unit['name']} ({self.new_hash[:7]} -> {digest[:7]})")
            else:
                self.echo(f"Replacing {unit['name']} ({_hash(unit['options'])[:7]} -> {digest[:7]})")
            self.client.create_unit(unit["name"], unit["desiredState"], options)
        waited = [u["name"] for u in batch if u["desiredState"] == "launched"]
        check = fleet_unit.parse_fleet_options(
            self.template.full, fleet_unit.UnitFile.from_options(options)
        ).health
        return self._wait_ready(waited, digest, check is not None)

    def _wait_ready(self, names: list[str], digest: str, has_check: bool) -> tuple[str, str] | None:
        deadline = time.monotonic() + self.timeout
        active_since: dict[str, float] = {}
        left = list(names)
        while left:
            # Blocks in fleetd until the agents publish the units launched, or a slice passes.
            self.client.wait_units(
                left, "launched", min(POLL_INTERVAL * 8, max(deadline - time.monotonic(), 0))
            )
            now = time.monotonic()
            for name in list(left):
                states = self.client.unit_states(unit_name=name)
                mine = [
                    s for s in states if s.get("hash") == digest and s.get("systemdActiveState") == "active"
                ]
                if mine:
                    active_since.setdefault(name, now)
                else:
                    active_since.pop(name, None)
                found = readiness(states, digest, has_check, now - active_since.get(name, now))
                if found.verdict == "failed":
                    return name, found.why
                if found.verdict == "ready":
                    where = mine[0].get("machineID", "")
                    self.echo(f"Unit {name} {'healthy' if has_check else 'active'} on {self.legend(where)}")
                    left.remove(name)
                elif now >= deadline:
                    return name, f"not ready after {self.timeout:g}s: {found.why}"
            if left:
                time.sleep(POLL_INTERVAL)
        return None

    def _roll_back(self, replaced: list[dict], max_unavailable: int) -> None:
        for batch in batches(list(reversed(replaced)), max_unavailable):
            by_content: dict[str, list[dict]] = {}
            for unit in batch:
                by_content.setdefault(_hash(unit["options"]), []).append(unit)
            for digest, units in by_content.items():
                failure = self._replace(units, units[0]["options"], digest, rolling_back=True)
                if failure is not None:
                    name, why = failure
                    raise click.ClickException(
                        f"rolling replace of {self.template.full} failed and so did its rollback, at {name}: {why}"
                    )
            for unit in batch:
                self.echo(f"Rolled back {unit['name']} to {_hash(unit['options'])[:7]}")


def _hash(options: Iterable[dict]) -> str:
    return fleet_unit.UnitFile.from_options(list(options)).hash
