"""systemd managers over D-Bus: one connection class shared by the agent and `cloud-config apply`."""

from fleetpy.systemd.bus import SystemdBus, SystemdError
from fleetpy.systemd.fake import FakeSystemd
from fleetpy.systemd.manager import DbusManager
from fleetpy.systemd.protocol import UNKNOWN_STATE, State, StateCallback, SystemdManager

__all__ = [
    "UNKNOWN_STATE",
    "DbusManager",
    "FakeSystemd",
    "State",
    "StateCallback",
    "SystemdBus",
    "SystemdError",
    "SystemdManager",
]
