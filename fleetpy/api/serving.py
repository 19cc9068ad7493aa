"""Putting the API application on fleetd's unix socket and, optionally, on TCP."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
import ssl
import stat
from pathlib import Path

from aiohttp import web

from fleetpy.api.auth import AUTH
from fleetpy.api.connections import GUARDS, LIMITS, AcceptErrorLog, ConnectionGuard, GuardedSite, Limits

log = logging.getLogger(__name__)
# One line per request, kept for debug logging (fleetd -v 1): at fleetd's default level it cost
# 0.17 ms of the 0.9-1.0 ms of server CPU a small GET takes (2,000 GETs on the unix socket,
# same run, on and off alternating twice), and a 60-unit start makes hundreds of requests.
ACCESS_LOG = logging.getLogger("fleetpy.api.access")

# Descriptors kept for everything but API clients: etcd connections, D-Bus, journal followers.
RESERVED_FDS = 256


def _parse_listen(listen: str) -> tuple[str, int]:
    host, colon, port = listen.rpartition(":")
    if not colon or not port.isdigit():
        raise ValueError(f"bad API listen address {listen!r}; expected HOST:PORT, e.g. 127.0.0.1:49153")
    return host.strip("[]") or "0.0.0.0", int(port)


def _remove_stale_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ValueError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody answers: left behind by a fleetd that died
    else:
        raise ValueError(f"another process already serves {path}; is fleetd running twice?")
    finally:
        probe.close()


def tcp_connection_limit(limits: Limits) -> int:
    """The TCP limit, lowered so that TCP clients can never take the unix socket's descriptors."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = soft - limits.unix_connections - RESERVED_FDS
    if soft != resource.RLIM_INFINITY and room < limits.tcp_connections:
        log.warning(
            "API: serving at most %d TCP connections, as only %d file descriptors are allowed "
            "(raise LimitNOFILE= to serve more)",
            max(room, 1),
            soft,
        )
        return max(room, 1)
    return limits.tcp_connections


def _check_tcp_auth(listen: str, token: str | None, client_ca: str | None, insecure: bool) -> None:
    if token or client_ca:
        return
    if not insecure:
        raise ValueError(
            f"refusing to serve the API on TCP {listen} without authentication: anyone who can "
            "reach it could run any command as fleetd's user on every machine. Give an API token "
            "(--api-token-file) or a client CA (--api-tls-client-ca), or --api-insecure if you mean it"
        )
    log.warning(
        "API: SERVING TCP %s WITHOUT AUTHENTICATION (--api-insecure): anyone who can reach it "
        "controls this cluster's units",
        listen,
    )


def server_tls(tls_cert: str, tls_key: str, client_ca: str | None, token: str | None) -> ssl.SSLContext:
    """TLS for the API; with a client CA, clients are verified (required, unless a token may stand in)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_cert, tls_key)
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_OPTIONAL if token else ssl.CERT_REQUIRED
    return context


async def serve(
    app: web.Application,
    *,
    socket_path: str,
    listen: str | None = None,
    token: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    client_ca: str | None = None,
    insecure: bool = False,
    limits: Limits | None = None,
) -> web.AppRunner:
    """Serve `app` on a unix socket (mode 0660) and, if `listen` is given, on TCP.

    The unix socket is guarded by file permissions. TCP needs the token or a client certificate
    signed by `client_ca` (which needs TLS); with neither it is refused unless `insecure`.
    Returns the runner; `await runner.cleanup()` stops serving within the shutdown timeout.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both a certificate and a key")
    if client_ca and not tls_cert:
        raise ValueError("client certificates need TLS: give the API a certificate and key too")
    if listen:
        _check_tcp_auth(listen, token, client_ca, insecure)
    limits = limits or app[LIMITS]
    address = _parse_listen(listen) if listen else None
    app[AUTH].token = token or None
    app[AUTH].client_certs = bool(client_ca)
    app[LIMITS] = limits
    path = Path(socket_path)
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    _remove_stale_socket(path)
    loop = asyncio.get_running_loop()
    if not isinstance(loop.get_exception_handler(), AcceptErrorLog):
        AcceptErrorLog().install(loop)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=limits.shutdown_timeout,
        access_log=ACCESS_LOG if ACCESS_LOG.isEnabledFor(logging.DEBUG) else None,
    )
    await runner.setup()
    try:
        unix = ConnectionGuard(limits.unix_connections, limits.header_timeout)
        app[GUARDS].all.append(unix)
        await GuardedSite(
            runner, unix, lambda factory: loop.create_unix_server(factory, str(path)), f"unix:{path}"
        ).start()
        os.chmod(path, 0o660)
        if address:
            context = server_tls(tls_cert, tls_key, client_ca, token) if tls_cert and tls_key else None
            tcp = ConnectionGuard(tcp_connection_limit(limits), limits.header_timeout)
            app[GUARDS].all.append(tcp)
            await GuardedSite(
                runner,
                tcp,
                lambda factory: loop.create_server(
                    factory,
                    address[0],
                    address[1],
                    ssl=context,
                    ssl_handshake_timeout=limits.header_timeout if context else None,
                ),
                f"{address[0]}:{address[1]}",
            ).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
