"""Who may use the API: anyone who can open the unix socket, TCP clients with the token."""

from __future__ import annotations

import dataclasses
import hmac
import socket
from typing import Any

from aiohttp import web

from fleetpy.api.errors import ApiError


@dataclasses.dataclass
class Auth:
    """The bearer token TCP clients must present; set by `serve`, None on the unix socket only."""

    token: str | None = None


AUTH = web.AppKey("auth", Auth)


@web.middleware
async def authenticate(request: web.Request, handler: Any) -> web.StreamResponse:
    token = request.app[AUTH].token
    sock = request.transport.get_extra_info("socket") if request.transport else None
    over_unix = sock is not None and sock.family == socket.AF_UNIX
    if token is not None and not over_unix:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ApiError(
                401,
                "missing or wrong API token; pass it as 'Authorization: Bearer "
                "TOKEN' (fleetctl --token or FLEETCTL_TOKEN)",
            )
    return await handler(request)
