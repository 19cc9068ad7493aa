"""Who may use the API: anyone who can open the unix socket; on TCP, a client with a certificate
signed by the cluster CA (mTLS) or with the bearer token, unless fleetd was told to be insecure.

fleetds forwarding a request to each other never send the token itself: a machine's API
endpoint comes from etcd, and whoever can write etcd could point it anywhere. They send a peer
proof instead: an HMAC, keyed with the token, of the receiving machine's id, the time, the method
and the path. It is good for PEER_PROOF_TTL seconds, on that machine, for that request only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import socket
import time
from typing import Any

from aiohttp import web

from fleetpy.api.errors import ApiError


@dataclasses.dataclass
class Auth:
    """What TCP clients must present; set by `serve`. With neither, TCP serves anyone (--api-insecure)."""

    token: str | None = None
    client_certs: bool = False
    # This machine's id: a peer proof names the machine it is meant for.
    machine_id: str = ""

    @property
    def required(self) -> bool:
        return self.token is not None or self.client_certs


AUTH = web.AppKey("auth", Auth)

# The dashboard's browsers cannot send a bearer header: they log in once at LOGIN_PATH, which
# sets the token as an HttpOnly, SameSite=Strict cookie that counts as the header.
TOKEN_COOKIE = "fleetpy_token"
LOGIN_PATH = "/ui/login"

PEER_SCHEME = "Fleetpy-Peer"
PEER_PROOF_TTL = 30.0


def _peer_mac(token: str, machine_id: str, stamp: int, method: str, raw_path: str) -> str:
    message = f"{machine_id}\n{stamp}\n{method}\n{raw_path}".encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def peer_proof(token: str, machine_id: str, method: str, raw_path: str, now: float | None = None) -> str:
    """The Authorization header value for a request to `machine_id`'s API at `raw_path` (with query)."""
    stamp = int(time.time() if now is None else now)
    return f"{PEER_SCHEME} {stamp} {_peer_mac(token, machine_id, stamp, method, raw_path)}"


def valid_peer_proof(auth: Auth, request: web.Request, given: str) -> bool:
    scheme, _, rest = given.partition(" ")
    stamp, _, mac = rest.partition(" ")
    # Plain digits of a sane length only: int() refuses "²" and 5,000-digit numbers by raising.
    if scheme != PEER_SCHEME or not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
        return False
    if auth.token is None:
        return False
    if abs(time.time() - int(stamp)) > PEER_PROOF_TTL:
        return False
    wanted = _peer_mac(auth.token, auth.machine_id, int(stamp), request.method, request.raw_path)
    return hmac.compare_digest(mac.encode(), wanted.encode())


def _over_unix(request: web.Request) -> bool:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    return sock is not None and sock.family == socket.AF_UNIX


def _verified_client_cert(request: web.Request) -> bool:
    # The TLS layer verified it against the client CA; without a CA none is ever asked for.
    return bool(request.transport and request.transport.get_extra_info("peercert"))


@web.middleware
async def authenticate(request: web.Request, handler: Any) -> web.StreamResponse:
    auth = request.app[AUTH]
    if not auth.required or _over_unix(request) or request.path == LOGIN_PATH:
        return await handler(request)
    if auth.client_certs and _verified_client_cert(request):
        return await handler(request)
    if auth.token is not None:
        given = request.headers.get("Authorization", "")
        if not given and TOKEN_COOKIE in request.cookies:
            given = f"Bearer {request.cookies[TOKEN_COOKIE]}"
        if hmac.compare_digest(given.encode(), f"Bearer {auth.token}".encode()):
            return await handler(request)
        if valid_peer_proof(auth, request, given):
            return await handler(request)
    token_help = "pass it as 'Authorization: Bearer TOKEN' (fleetctl --token or FLEETCTL_TOKEN)"
    if not auth.client_certs:
        raise ApiError(401, f"missing or wrong API token; {token_help}")
    if auth.token is None:
        raise ApiError(401, "no client certificate; this API needs one signed by the cluster CA")
    raise ApiError(
        401, f"missing or wrong API token and no client certificate; {token_help}, or use a certificate"
    )
