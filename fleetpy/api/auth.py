"""Who may use the API: anyone who can open the unix socket; on TCP, a client with a certificate
signed by the cluster CA (mTLS) or with the bearer token, unless fleetd was told to be insecure."""

from __future__ import annotations

import dataclasses
import hmac
import socket
from typing import Any

from aiohttp import web

from fleetpy.api.errors import ApiError


@dataclasses.dataclass
class Auth:
    """What TCP clients must present; set by `serve`. With neither, TCP serves anyone (--api-insecure)."""

    token: str | None = None
    client_certs: bool = False

    @property
    def required(self) -> bool:
        return self.token is not None or self.client_certs


AUTH = web.AppKey("auth", Auth)


def _over_unix(request: web.Request) -> bool:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    return sock is not None and sock.family == socket.AF_UNIX


def _verified_client_cert(request: web.Request) -> bool:
    # The TLS layer verified it against the client CA; without a CA none is ever asked for.
    return bool(request.transport and request.transport.get_extra_info("peercert"))


@web.middleware
async def authenticate(request: web.Request, handler: Any) -> web.StreamResponse:
    auth = request.app[AUTH]
    if not auth.required or _over_unix(request):
        return await handler(request)
    if auth.client_certs and _verified_client_cert(request):
        return await handler(request)
    if auth.token is not None:
        given = request.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {auth.token}".encode()):
            return await handler(request)
    token_help = "pass it as 'Authorization: Bearer TOKEN' (fleetctl --token or FLEETCTL_TOKEN)"
    if not auth.client_certs:
        raise ApiError(401, f"missing or wrong API token; {token_help}")
    if auth.token is None:
        raise ApiError(401, "no client certificate; this API needs one signed by the cluster CA")
    raise ApiError(
        401, f"missing or wrong API token and no client certificate; {token_help}, or use a certificate"
    )
