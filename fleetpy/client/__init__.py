"""Client of fleetd's HTTP API, used by fleetctl."""

from fleetpy.client.http import APIError, Client, ConnectionFailed, EtcdUnreachable, NoAnswer

__all__ = ["APIError", "Client", "ConnectionFailed", "EtcdUnreachable", "NoAnswer"]
