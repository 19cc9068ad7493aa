"""What the fault suite checks after every fault, and what it measures while it waits.

The invariants, read from systemd on every node and from etcd:
- every launched unit runs exactly once on an eligible machine (a global unit: once on every
  live machine), or runs nowhere and is pending with a reason;
- Conflicts is never violated (sampled all along, not only at the end);
- no unit of a healthy machine was restarted (its MainPID is unchanged);
- nothing in etcd was lost (every job and every unit file is still there).
"""

from __future__ import annotations

import asyncio
import datetime
import statistics
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx

from fleetpy.lab.lab import Lab, LabError
from fleetpy.registry import Job, Registry, StoreError
from fleetpy.unit import UnitFile

T = TypeVar("T")

# Long enough that a fleetd restarted on a busy CI machine is back within it.
AGENT_TTL = 5.0
# A fleetd that takes longer than this to start again (from its start to serving its API, which
# it registers right after) is back too late for the TTL: the engine may rightly have moved its
# units. On a machine loaded far beyond CI (a load of 20 on 2 cores: 12 s), such a node's units
# are not counted as needless restarts; each such start is reported. A second is left for the
# stop before it and the registration after it.
SLOW_START = AGENT_TTL - 1.0
SLEEP = "[Service]\nExecStart=/bin/sleep 100000\n"
TEMPLATES = {
    "plain@.service": SLEEP,
    "web@.service": SLEEP + "[X-Fleet]\nConflicts=web@*.service\n",
    "db.service": SLEEP + "[X-Fleet]\nMachineMetadata=role=db\n",
    "everywhere.service": SLEEP + "[X-Fleet]\nGlobal=true\n",
}
WORKLOAD = {
    **{f"plain@{i}.service": "plain@.service" for i in range(1, 7)},
    **{f"web@{i}.service": "web@.service" for i in range(1, 4)},
    "db.service": "db.service",
    "everywhere.service": "everywhere.service",
}
CONFLICTING = "web@"
GLOBAL = "everywhere.service"


def options(text: str) -> list[dict]:
    return [{"section": o.section, "name": o.name, "value": o.value} for o in UnitFile.parse(text).options]


def pinned_role(unit: str) -> str | None:
    return "db" if unit == "db.service" else None


@dataclass
class Snapshot:
    """What runs where: node -> unit -> MainPID, for the nodes that are up."""

    running: dict[str, dict[str, int]]

    def nodes_of(self, unit: str) -> set[str]:
        return {node for node, units in self.running.items() if unit in units}

    def duplicates(self) -> set[str]:
        units = Counter(u for units in self.running.values() for u in units if u != GLOBAL)
        return {u for u, n in units.items() if n > 1}

    def conflicts(self) -> list[str]:
        return [
            f"{node}: {', '.join(sorted(web))}"
            for node, units in self.running.items()
            if len(web := [u for u in units if u.startswith(CONFLICTING)]) > 1
        ]


@dataclass
class Scenario:
    """Numbers for one fault scenario of the report."""

    name: str
    recovery_s: list[float] = field(default_factory=list)
    duplicate_window_s: float = 0.0
    requests: Counter = field(default_factory=Counter)
    crashes: int = 0
    needless_restarts: int = 0
    slow_fleetd_starts: int = 0
    conflict_violations: int = 0
    notes: list[str] = field(default_factory=list)

    def report(self) -> dict:
        times = sorted(self.recovery_s)
        return {
            "runs": len(times),
            "recovery_s": {
                "min": round(times[0], 2) if times else None,
                "median": round(statistics.median(times), 2) if times else None,
                "max": round(times[-1], 2) if times else None,
            },
            "duplicate_window_s": round(self.duplicate_window_s, 2),
            "requests_tried": sum(self.requests.values()),
            "responses": dict(sorted(self.requests.items())),
            "server_errors_5xx_not_503": sum(
                n for s, n in self.requests.items() if s.startswith("5") and s != "503"
            ),
            "crashes": self.crashes,
            "needless_restarts": self.needless_restarts,
            "slow_fleetd_starts": self.slow_fleetd_starts,
            "conflicts_violations": self.conflict_violations,
            "notes": self.notes,
        }


class Harness:
    def __init__(self, lab: Lab, backend: str):
        self.lab = lab
        self.backend = backend  # the registry backend the lab's fleetds use: "v3" or "v2"
        self.report: dict[str, dict] = {}
        self.fleetd_starts: list[tuple[str, datetime.datetime]] = []  # (node, when), by the scenario

    # -- the cluster -----------------------------------------------------------------------

    @property
    def nodes(self) -> list[str]:
        return [n.name for n in self.lab.state.nodes]

    def node_alive(self, name: str) -> bool:
        try:
            self.lab.node(name)
            return True
        except LabError:
            return False

    def machine_of(self, name: str) -> str:
        return self.lab.state.node(name).machine_id

    def name_of(self, machine_id: str | None) -> str | None:
        return next((n.name for n in self.lab.state.nodes if n.machine_id == machine_id), None)

    def socket(self, name: str) -> Path:
        return self.lab.dir / name / "fleet.sock"

    def client(self, name: str) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket(name))), timeout=15)

    def read(self, call: Callable[[Registry], Awaitable[T]]) -> T:
        """`call(registry)` on the lab's etcd (the harness is synchronous)."""
        return self.lab.read(call, retry_for=3.0)

    def leader(self) -> str | None:
        try:
            return self.name_of(self.read(lambda r: r.leader()))
        except StoreError:
            return None

    def wait_leader(self, timeout: float = 4 * AGENT_TTL) -> str:
        """The node whose engine leads, once one does."""
        started = time.monotonic()
        while (leader := self.leader()) is None:
            assert time.monotonic() - started < timeout, f"no engine took the lease in {timeout:.0f}s"
            time.sleep(0.1)
        return leader

    def start_fleetd(self, name: str) -> None:
        """Start the node's fleetd again, noting when (see `slow_starts`)."""
        self.fleetd_starts.append((name, datetime.datetime.now()))
        self.lab.start_fleetd(name)

    def slow_starts(self) -> dict[str, float]:
        """Nodes whose fleetd, started since the scenario began, took longer than SLOW_START to
        serve its API (from its own log), with the longest such start."""
        slow: dict[str, float] = {}
        for name, started in self.fleetd_starts:
            up = self._up_after(name, started)
            took = (up - started).total_seconds() if up else float("inf")
            if took > SLOW_START:
                slow[name] = max(slow.get(name, 0.0), took)
        return slow

    def _up_after(self, name: str, started: datetime.datetime) -> datetime.datetime | None:
        for line in (self.lab.dir / name / "fleetd.log").read_text().splitlines():
            if " up: api " in line:
                when = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                if when >= started:
                    return when
        return None

    def fleetd_pids(self) -> dict[str, int]:
        return {n.name: n.fleetd_pid for n in self.lab.state.nodes if self.lab.fleetd_alive(n)}

    # -- the workload ----------------------------------------------------------------------

    def submit(self, via: str, names: dict[str, str] | None = None, state: str = "launched") -> None:
        with self.client(via) as client:
            for unit, template in (names or WORKLOAD).items():
                body = {"desiredState": state, "options": options(TEMPLATES[template])}
                response = client.put(f"http://fleet/fleet/v1/units/{unit}", json=body)
                assert response.status_code in (200, 201, 204), response.text

    def destroy(self, via: str, names: list[str]) -> None:
        with self.client(via) as client:
            for unit in names:
                client.delete(f"http://fleet/fleet/v1/units/{unit}")

    def observe(self) -> Snapshot:
        running: dict[str, dict[str, int]] = {}
        jobs = set(WORKLOAD) | {j.name for j in self._jobs_or_empty()}
        for name in self.nodes:
            if not self.node_alive(name):
                continue
            out = self.lab.node(name).run(
                [
                    "systemctl",
                    "--user",
                    "show",
                    "-p",
                    "Id",
                    "-p",
                    "ActiveState",
                    "-p",
                    "MainPID",
                    *sorted(jobs),
                ],
                timeout=10,
            )
            running[name] = {}
            for block in out.stdout.strip().split("\n\n"):
                fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
                if fields.get("ActiveState") == "active" and fields.get("Id") in jobs:
                    running[name][fields["Id"]] = int(fields.get("MainPID", "0"))
        return Snapshot(running)

    def _jobs_or_empty(self) -> list[Job]:
        try:
            return self.read(lambda r: r.jobs())
        except StoreError:
            return []

    def etcd_contents(self) -> tuple[dict[str, Job], set[str]]:
        async def contents(registry: Registry) -> tuple[dict[str, Job], set[str]]:
            jobs = {j.name: j for j in await registry.jobs()}
            files = {h for h in {j.hash for j in jobs.values()} if await registry.unit_file(h) is not None}
            return jobs, files

        return self.read(contents)

    # -- the invariants --------------------------------------------------------------------

    def violations(self, snap: Snapshot, machines_up: set[str]) -> list[str]:
        """Everything wrong with the cluster now; empty when every invariant holds.

        `machines_up` are the nodes whose fleetd is registered and reachable: global units must
        run on each of them, and nothing may run twice among them.
        """
        pending, jobs = self.read(lambda r: asyncio.gather(r.pending(), r.jobs()))
        roles = {n.name: n.metadata.get("role") for n in self.lab.state.nodes}
        problems = [f"Conflicts violated on {c}" for c in snap.conflicts()]
        for job in jobs:
            if job.desired_state != "launched" or "@." in job.name:
                continue
            where = snap.nodes_of(job.name) & machines_up
            if job.name == GLOBAL:
                if where != machines_up:
                    problems.append(
                        f"{GLOBAL} runs on {sorted(where)}, not on every machine {sorted(machines_up)}"
                    )
                continue
            if len(where) > 1:
                problems.append(f"{job.name} runs {len(where)} times: {sorted(where)}")
            elif not where and not pending.get(job.name):
                problems.append(f"{job.name} runs nowhere and has no pending reason")
            elif where and (role := pinned_role(job.name)) and roles[next(iter(where))] != role:
                problems.append(f"{job.name} runs on {where} without role={role}")
        return problems

    def settle(
        self, machines_up: set[str] | None = None, timeout: float = 60.0, scenario: Scenario | None = None
    ):
        """Wait until every invariant holds; returns (seconds, snapshot). Samples duplicates and
        Conflicts all along into `scenario`."""
        machines_up = set(self.nodes) if machines_up is None else machines_up
        started = time.monotonic()
        first_duplicate = last_duplicate = None
        problems: list[str] = []
        while time.monotonic() - started < timeout:
            snap = self.observe()
            now = time.monotonic()
            if snap.duplicates():
                first_duplicate = first_duplicate or now
                last_duplicate = now
            if scenario is not None:
                scenario.conflict_violations += len(snap.conflicts())
            try:
                problems = self.violations(snap, machines_up)
            except StoreError as error:
                problems = [f"etcd: {error}"]
            if not problems:
                if scenario is not None and first_duplicate is not None:
                    scenario.duplicate_window_s = max(
                        scenario.duplicate_window_s, last_duplicate - first_duplicate
                    )
                return now - started, snap
            time.sleep(0.2)
        raise AssertionError(f"invariants still broken after {timeout:.0f}s: {problems}")

    @staticmethod
    def restarted(before: Snapshot, after: Snapshot, healthy: set[str]) -> list[str]:
        """Units of healthy machines that were restarted or moved away."""
        return [
            f"{unit} on {node} (MainPID {pid} -> {after.running.get(node, {}).get(unit, 'gone')})"
            for node in healthy
            for unit, pid in before.running.get(node, {}).items()
            if after.running.get(node, {}).get(unit) != pid
        ]

    def log_lines(self, *words: str, last: int = 40) -> str:
        """The fleetd log lines (every node) that mention one of `words`: context for a failure."""
        lines = []
        for name in self.nodes:
            path = self.lab.dir / name / "fleetd.log"
            if path.exists():
                lines += [
                    f"{name}: {line}"
                    for line in path.read_text().splitlines()
                    if any(w in line for w in words)
                ]
        return "\n".join(sorted(lines, key=lambda line: line.split(" ", 1)[1])[-last:])

    def record(self, scenario: Scenario) -> None:
        self.report[scenario.name] = scenario.report()


class ApiLoad:
    """A client polling the API during a fault, counting the answers by status code."""

    def __init__(self, harness: Harness, via: list[str], scenario: Scenario, interval: float = 0.1):
        self.harness, self.via, self.scenario, self.interval = harness, via, scenario, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ApiLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(20)

    def _run(self) -> None:
        paths = ["/fleet/v1/units", "/fleet/v1/state", "/fleet/v1/machines"]
        i = 0
        while not self._stop.wait(self.interval):
            node = self.via[i % len(self.via)]
            path = paths[i % len(paths)]
            i += 1
            try:
                with self.harness.client(node) as client:
                    status = str(client.get(f"http://fleet{path}").status_code)
            except httpx.HTTPError:
                status = "unreachable"
            self.scenario.requests[status] += 1


class MetadataEdits:
    """A client editing one machine's metadata through the API every `interval` during a fault
    (PATCH /fleet/v1/machines): each edit wakes the leader's engine."""

    def __init__(
        self, harness: Harness, via: str, machine_id: str, scenario: Scenario, interval: float = 0.3
    ):
        self.harness, self.via, self.machine_id = harness, via, machine_id
        self.scenario, self.interval = scenario, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MetadataEdits:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(20)

    def _run(self) -> None:
        edit = 0
        while not self._stop.wait(self.interval):
            edit += 1
            patch = [{"op": "add", "path": f"/{self.machine_id}/metadata/edited", "value": str(edit)}]
            try:
                with self.harness.client(self.via) as client:
                    status = str(client.patch("http://fleet/fleet/v1/machines", json=patch).status_code)
            except httpx.HTTPError:
                status = "unreachable"
            self.scenario.requests[status] += 1
