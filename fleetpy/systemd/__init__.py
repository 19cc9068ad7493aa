"""systemd managers over D-Bus: one connection class shared by the agent and `cloud-config apply`."""

from fleetpy.systemd.bus import SystemdBus, SystemdError
from fleetpy.systemd.fake import FakeSystemd
from fleetpy.systemd.manager import SystemdManager

__all__ = ["FakeSystemd", "SystemdBus", "SystemdError", "SystemdManager"]
