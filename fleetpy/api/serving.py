"""Putting the API application on fleetd's unix socket and, optionally, on TCP."""

from __future__ import annotations

import os
import socket
import ssl
import stat
from pathlib import Path

from aiohttp import web

from fleetpy.api.auth import AUTH


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


async def serve(
    app: web.Application,
    *,
    socket_path: str,
    listen: str | None = None,
    token: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> web.AppRunner:
    """Serve `app` on a unix socket (mode 0660) and, if `listen` is given, on TCP.

    TCP needs a token or TLS: the unix socket is guarded by file permissions, TCP by nothing
    else. Returns the runner; `await runner.cleanup()` stops serving.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both a certificate and a key")
    if listen and not (token or tls_cert):
        raise ValueError(
            f"refusing to serve the API on TCP {listen} without authentication; "
            "give an API token or a TLS certificate and key"
        )
    address = _parse_listen(listen) if listen else None
    app[AUTH].token = token or None
    path = Path(socket_path)
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    _remove_stale_socket(path)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.UnixSite(runner, str(path)).start()
        os.chmod(path, 0o660)
        if address:
            context = None
            if tls_cert:
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.load_cert_chain(tls_cert, tls_key)
            await web.TCPSite(runner, address[0], address[1], ssl_context=context).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
