"""The records kept in the registry: machines, jobs, schedule entries and unit states."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

DESIRED_STATES = ("inactive", "loaded", "launched")


@dataclass(frozen=True)
class Machine:
    """A live fleetd host, as it registered itself."""

    id: str
    public_ip: str = ""
    metadata: dict[str, str] = field(default_factory=dict, hash=False)
    # http(s)://host:port of this machine's fleetd API, when it listens on TCP; used to reach
    # the machine that runs a unit for `fleetctl status/journal`.
    api_endpoint: str = ""
    # Drained (`fleetctl drain`): laid over the agent's record from cordon/<id>, never written
    # by the agent, so the scheduler keeps new units off it and moves its units away.
    cordoned: bool = False
    # What units may reserve here: "cpus" and "memory" (bytes), read from the host and its
    # cgroup or set in fleetd's config; empty from a fleetd that predates them.
    capacity: dict[str, float] = field(default_factory=dict, hash=False)
    # Live facts (os, kernel, load1, memory_free, facts.d output, ...), refreshed by the agent.
    facts: dict[str, str | float] = field(default_factory=dict, hash=False)
    # Whether its fleetd has a shared volume directory (--shared-volume-dir), so it can run
    # units with a Volume=NAME:shared.
    shared_volumes: bool = False

    def to_json(self) -> dict:
        record = {
            "id": self.id,
            "primaryIP": self.public_ip,
            "metadata": dict(self.metadata),
            "apiEndpoint": self.api_endpoint,
        }
        if self.capacity:
            record["capacity"] = dict(self.capacity)
        if self.facts:
            record["facts"] = dict(self.facts)
        if self.shared_volumes:
            record["sharedVolumes"] = True
        return record

    @classmethod
    def from_json(cls, data: dict) -> Machine:
        return cls(
            id=data["id"],
            public_ip=data.get("primaryIP", ""),
            metadata=dict(data.get("metadata") or {}),
            api_endpoint=data.get("apiEndpoint", ""),
            capacity={k: float(v) for k, v in (data.get("capacity") or {}).items()},
            facts=dict(data.get("facts") or {}),
            shared_volumes=data.get("sharedVolumes") is True,
        )

    def attributes(self) -> dict[str, str | float]:
        """What MachineConstraint keys name: capacity, facts, then metadata (set by people) over them."""
        return {**self.capacity, **self.facts, **self.metadata}


@dataclass(frozen=True)
class Job:
    """A unit the user submitted, with the state they want it in."""

    name: str
    hash: str
    desired_state: str = "inactive"

    def to_json(self) -> dict:
        return {"name": self.name, "hash": self.hash, "desiredState": self.desired_state}

    @classmethod
    def from_json(cls, data: dict) -> Job:
        return cls(name=data["name"], hash=data["hash"], desired_state=data["desiredState"])


@dataclass(frozen=True)
class Assignment:
    """The engine's decision: run this unit (this content, in this state) on this machine."""

    unit: str
    machine_id: str
    hash: str
    desired_state: str

    def to_json(self) -> dict:
        return {
            "unit": self.unit,
            "machineID": self.machine_id,
            "hash": self.hash,
            "desiredState": self.desired_state,
        }

    @classmethod
    def from_json(cls, data: dict) -> Assignment:
        return cls(
            unit=data["unit"],
            machine_id=data["machineID"],
            hash=data["hash"],
            desired_state=data["desiredState"],
        )


@dataclass(frozen=True)
class Health:
    """What a unit's health check found, as its agent publishes it with the unit's state."""

    status: str  # "starting" (no success yet), "healthy" or "unhealthy"
    failures: int = 0  # failed checks in a row
    restarts: int = 0  # restarts the agent made for failed checks since the unit came here
    message: str = ""  # what the last failed check said

    def to_json(self) -> dict:
        return {
            "status": self.status,
            "failures": self.failures,
            "restarts": self.restarts,
            "message": self.message,
        }

    @classmethod
    def from_json(cls, data: dict) -> Health:
        return cls(
            status=str(data["status"]),
            failures=int(data.get("failures", 0)),
            restarts=int(data.get("restarts", 0)),
            message=str(data.get("message", "")),
        )


@dataclass(frozen=True)
class UnitState:
    """What systemd on a machine reports for a unit, as published by that machine's agent."""

    unit: str
    machine_id: str
    hash: str
    load_state: str
    active_state: str
    sub_state: str
    # Why the unit failed or cannot load, in systemd's words (or why the agent set it aside);
    # "" while all is well. Fleet's clients ignore the extra field.
    reason: str = ""
    # Only for a unit with an [X-Fleet] health check that runs; None otherwise.
    health: Health | None = None

    def to_json(self) -> dict:
        record: dict = {
            "name": self.unit,
            "machineID": self.machine_id,
            "hash": self.hash,
            "systemdLoadState": self.load_state,
            "systemdActiveState": self.active_state,
            "systemdSubState": self.sub_state,
        }
        if self.reason:
            record["reason"] = self.reason
        if self.health is not None:
            record["health"] = self.health.to_json()
        return record

    @classmethod
    def from_json(cls, data: dict) -> UnitState:
        return cls(
            unit=data["name"],
            machine_id=data["machineID"],
            hash=data["hash"],
            load_state=data["systemdLoadState"],
            active_state=data["systemdActiveState"],
            sub_state=data["systemdSubState"],
            reason=data.get("reason", ""),
            health=Health.from_json(data["health"]) if data.get("health") else None,
        )


@dataclass(frozen=True)
class Avoidance:
    """A machine the engine keeps a unit off: its health check failed there after the unit was
    restarted HealthCheckMoveAfter times. Holds for the unit's content `hash` only."""

    unit: str
    machine_id: str
    hash: str
    restarts: int
    message: str = ""  # what the last failed check said there

    def to_json(self) -> dict:
        return {
            "unit": self.unit,
            "machineID": self.machine_id,
            "hash": self.hash,
            "restarts": self.restarts,
            "message": self.message,
        }

    @classmethod
    def from_json(cls, data: dict) -> Avoidance:
        return cls(
            unit=data["unit"],
            machine_id=data["machineID"],
            hash=data["hash"],
            restarts=int(data["restarts"]),
            message=str(data.get("message", "")),
        )


@dataclass(frozen=True)
class Event:
    """Something that happened in the cluster, as the fleetd that saw it recorded it.

    `reporter` and `seq` identify an event: each fleetd numbers its own events from 1.
    """

    time: str  # UTC, ISO 8601 with milliseconds: "2026-12-02T07:55:01.123Z"
    reporter: str
    seq: int
    kind: str  # MachineJoined, UnitStarted, ... (fleetpy.events.kinds)
    type: str  # "Normal" or "Warning", as Kubernetes events
    message: str
    unit: str = ""
    machine_id: str = ""

    def to_json(self) -> dict:
        return {
            "time": self.time,
            "reporter": self.reporter,
            "seq": self.seq,
            "kind": self.kind,
            "type": self.type,
            "unit": self.unit,
            "machineID": self.machine_id,
            "message": self.message,
        }

    @classmethod
    def from_json(cls, data: dict) -> Event:
        return cls(
            time=data["time"],
            reporter=data["reporter"],
            seq=int(data["seq"]),
            kind=data["kind"],
            type=data.get("type", "Normal"),
            message=data.get("message", ""),
            unit=data.get("unit", ""),
            machine_id=data.get("machineID", ""),
        )


# A local volume's move (`fleetctl volume move`), as recorded on its volumes/<name> key.
MOVE_STOPPING = "stopping"  # the engine keeps its units off every machine; the source stops them
MOVE_COPYING = "copying"  # its units are stopped: the source serves the data, the target pulls it
MOVE_DONE = "done"  # the target holds the data, and the volume lives there
MOVE_FAILED = "failed"  # the volume stays on the source; `reason` says why
MOVE_STATES = (MOVE_STOPPING, MOVE_COPYING, MOVE_DONE, MOVE_FAILED)


@dataclass(frozen=True)
class VolumeMove:
    """The last move of a volume: from `source` to `target`, where it stands, and when."""

    source: str
    target: str
    state: str
    started: float  # Unix time
    finished: float = 0.0
    reason: str = ""  # why it failed
    size: int = 0  # bytes copied

    @property
    def under_way(self) -> bool:
        return self.state in (MOVE_STOPPING, MOVE_COPYING)

    def to_json(self) -> dict:
        record: dict = {
            "source": self.source,
            "target": self.target,
            "state": self.state,
            "started": self.started,
        }
        if self.finished:
            record["finished"] = self.finished
        if self.reason:
            record["reason"] = self.reason
        if self.size:
            record["bytes"] = self.size
        return record

    @classmethod
    def from_json(cls, data: dict) -> VolumeMove:
        state = str(data["state"])
        if state not in MOVE_STATES:
            raise ValueError(f"unknown move state {state!r}")
        return cls(
            source=str(data["source"]),
            target=str(data["target"]),
            state=state,
            started=float(data["started"]),
            finished=float(data.get("finished", 0.0)),
            reason=str(data.get("reason", "")),
            size=int(data.get("bytes", 0)),
        )


@dataclass(frozen=True)
class VolumeRecord:
    """Where a local volume lives, and its last move if it ever moved.

    Stored as the bare machine id until the volume first moves (what older fleetds wrote), as
    JSON after that.
    """

    machine_id: str
    move: VolumeMove | None = None

    def to_text(self) -> str:
        if self.move is None:
            return self.machine_id
        return json.dumps({"machineID": self.machine_id, "move": self.move.to_json()}, sort_keys=True)

    @classmethod
    def from_text(cls, text: str) -> VolumeRecord:
        if not text.startswith("{"):
            return cls(text)
        data = json.loads(text)
        move = data.get("move")
        return cls(str(data["machineID"]), VolumeMove.from_json(move) if move else None)

    @property
    def moving(self) -> VolumeMove | None:
        """The move under way, if one is."""
        return self.move if self.move is not None and self.move.under_way else None
