"""One machine's fleetd, built from its seams: a registry, a systemd manager and a clock.

`fleetd` builds it over etcd and D-Bus; tests build the same thing over the memory registry
and FakeSystemd, so what they run is the real agent and engine, supervised as in production.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fleetpy.agent.agent import Agent
from fleetpy.agent.facts import HostFacts, detect_capacity
from fleetpy.agent.moves import VolumeSource
from fleetpy.engine.engine import Engine
from fleetpy.events import AgentEvents, EngineEvents, Recorder
from fleetpy.fleetd.config import Config, machine_id
from fleetpy.registry import Machine, Registry
from fleetpy.supervise import supervise
from fleetpy.systemd import SystemdManager


def machine_of(config: Config) -> Machine:
    """This machine as its agent registers it: what its config says, and the capacity its host
    offers where the config does not say."""
    capacity = {**detect_capacity(config.unit_dir), **config.capacity}
    return Machine(
        machine_id(config),
        config.public_ip,
        dict(config.metadata),
        api_endpoint(config),
        capacity=capacity,
        shared_volumes=bool(config.shared_volume_dir),
    )


def api_endpoint(config: Config) -> str:
    """Where peers reach this fleetd's API over TCP, or "" when it serves only its unix socket."""
    if not config.api_listen:
        return ""
    host, _, port = config.api_listen.rpartition(":")
    if host in ("", "0.0.0.0", "[::]"):
        host = config.public_ip or "127.0.0.1"
    scheme = "https" if config.api_tls_cert else "http"
    return f"{scheme}://{host}:{port}"


@dataclass
class Fleetd:
    """The agent and (unless disabled) the engine of one machine; the API is served beside it."""

    machine: Machine
    registry: Registry
    agent: Agent
    engine: Engine | None
    recorder: Recorder
    restart_pause: float | None = None  # supervise's default

    async def run(self) -> None:
        """Run until cancelled; each part is supervised, so none can end the others."""
        parts = [
            supervise("agent", self.agent.run, self.restart_pause),
            supervise("event recorder", self.recorder.run, self.restart_pause),
        ]
        if self.engine is not None:
            parts.append(supervise("engine", self.engine.run, self.restart_pause))
        async with asyncio.TaskGroup() as group:
            for part in parts:
                group.create_task(part)


def build_fleetd(
    config: Config,
    registry: Registry,
    systemd: SystemdManager,
    clock: Callable[[], float] = time.monotonic,
    volume_source: VolumeSource | None = None,
) -> Fleetd:
    """The fleetd that `config` describes, over the given registry, systemd manager and clock;
    `volume_source` fetches the volumes that move here from their machines (api.peer.Peers)."""
    machine = machine_of(config)
    recorder = Recorder(registry, machine.id)
    events = AgentEvents(recorder, systemd.failure_reason)
    facts = HostFacts(machine.capacity, config.unit_dir, config.facts_dir)
    agent = Agent(
        registry,
        systemd,
        machine,
        config.agent_ttl,
        fence=config.fence,
        events=events,
        facts=facts,
        facts_interval=config.facts_interval,
        volume_dir=Path(config.volume_dir),
        volume_source=volume_source,
        shared_volume_dir=Path(config.shared_volume_dir) if config.shared_volume_dir else None,
    )
    engine = (
        None
        if config.disable_engine
        else Engine(
            registry,
            machine.id,
            config.agent_ttl,
            config.engine_reconcile_interval,
            clock=clock,
            events=EngineEvents(recorder, config.agent_ttl, config.events_retention, clock),
        )
    )
    return Fleetd(machine, registry, agent, engine, recorder)
