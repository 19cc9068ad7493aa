"""Cluster events: what happened and why, recorded by each fleetd into a bounded history in etcd.

`Recorder` takes events from the agent and engine without ever blocking or failing them and
writes them in batches; `AgentEvents` and `EngineEvents` turn what those loops see into events.
"""

from fleetpy.events.agent import AgentEvents
from fleetpy.events.engine import EngineEvents
from fleetpy.events.recorder import HISTORY, Recorder

__all__ = ["HISTORY", "AgentEvents", "EngineEvents", "Recorder"]
