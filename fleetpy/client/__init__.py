"""Client of fleetd's HTTP API, used by fleetctl."""

from fleetpy.client.http import APIError, Client, ConnectionFailed

__all__ = ["APIError", "Client", "ConnectionFailed"]
