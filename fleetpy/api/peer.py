"""Passing a status or journal request on to the fleetd of the machine that runs the unit.

A peer's endpoint comes from its machine record in etcd, so it is only as trustworthy as etcd.
Two defences: the token never leaves this machine (a peer gets a proof for one request, see
`auth`), and with a cluster CA a peer must be https with a certificate that CA signed for the
endpoint's address, and this fleetd presents its own certificate to it.

httpx is imported on the first forwarded request: with what it pulls in (rich, pygments, click
for its command line) it was a fifth of an idle fleetd's memory, for a path many never take.
"""

from __future__ import annotations

import functools
import json
import ssl
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import quote

from aiohttp import web

from fleetpy.api.auth import peer_proof
from fleetpy.api.errors import ApiError
from fleetpy.conf.values import short_machine_id
from fleetpy.registry import Registry

if TYPE_CHECKING:
    import httpx

# How long a volume's stream may pause (a source packing a large file) before the copy fails.
VOLUME_READ_TIMEOUT = 120.0
# Marks a request one fleetd passed to another, so a stale schedule cannot bounce it around.
FORWARDED_HEADER = "X-Fleetpy-Forwarded"


def peer_tls(cluster_ca: str, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """TLS towards peers: verified against the cluster CA, presenting this fleetd's certificate."""
    context = ssl.create_default_context(cafile=cluster_ca)
    if cert and key:
        context.load_cert_chain(cert, key)
    return context


@functools.cache
def _default_tls() -> ssl.SSLContext:
    """httpx's default context, for peers without a cluster CA: made once, not for every forwarded
    request (loading the CA bundle costs more than the request)."""
    import httpx

    return httpx.create_ssl_context()


def _message(body: bytes) -> str:
    """The message of an API error body, or the body itself."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace")


class Peers:
    """Forwards requests to other machines' APIs."""

    def __init__(
        self, registry: Registry, machine_id: str, token: str | None, tls: ssl.SSLContext | None = None
    ):
        self.registry = registry
        self.machine_id = machine_id
        self.token = token
        self.tls = tls

    async def endpoint(self, request: web.Request, machine_id: str) -> str:
        """The API endpoint of another machine, after checking the request may go there."""
        if request.headers.get(FORWARDED_HEADER):
            raise ApiError(
                502,
                f"request was forwarded to {self.machine_id}, which does not run "
                "the unit; the schedule changed meanwhile, try again",
            )
        return await self.endpoint_of(machine_id)

    async def endpoint_of(self, machine_id: str) -> str:
        """The API endpoint of another machine, if it has one this fleetd may talk to."""
        machine = next((m for m in await self.registry.machines() if m.id == machine_id), None)
        if machine is None:
            raise ApiError(502, f"machine {machine_id} is no longer alive")
        if not machine.api_endpoint:
            raise ApiError(
                502,
                f"machine {short_machine_id(machine_id)} has no API endpoint; start its fleetd with --api-listen",
            )
        if self.tls is not None and not machine.api_endpoint.startswith("https://"):
            raise ApiError(
                502,
                f"machine {short_machine_id(machine_id)}'s API endpoint {machine.api_endpoint} is not https; "
                "with a cluster CA this fleetd talks only to peers that prove who they are",
            )
        return machine.api_endpoint.rstrip("/")

    def client(self, timeout: httpx.Timeout | float) -> httpx.AsyncClient:
        import httpx

        return httpx.AsyncClient(timeout=timeout, verify=self.tls if self.tls is not None else _default_tls())

    def request(self, client: httpx.AsyncClient, url: str, machine_id: str, params: dict) -> httpx.Request:
        request = client.build_request("GET", url, params=params, headers={FORWARDED_HEADER: self.machine_id})
        if self.token:
            raw_path = request.url.raw_path.decode()
            request.headers["Authorization"] = peer_proof(self.token, machine_id, "GET", raw_path)
        return request

    def unreachable(self, machine_id: str, endpoint: str, error: Exception) -> str:
        import httpx

        if isinstance(error, httpx.ConnectError) and "CERTIFICATE_VERIFY_FAILED" in str(error):
            return (
                f"machine {short_machine_id(machine_id)} at {endpoint} is not who it claims to be: its certificate "
                f"does not verify against the cluster CA ({error}); its etcd record may have been tampered with"
            )
        return f"cannot reach machine {short_machine_id(machine_id)} at {endpoint}: {error}"

    async def fetch_volume(self, machine_id: str, name: str, sink: BinaryIO) -> None:
        """Write the tar stream of volume `name`, which `machine_id` serves while it moves here,
        into `sink` (agent.moves.VolumeSource)."""
        import httpx

        endpoint = await self.endpoint_of(machine_id)
        url = f"{endpoint}/fleetpy/v1/volumes/{quote(name, safe='')}/data"
        try:
            async with self.client(httpx.Timeout(15, read=VOLUME_READ_TIMEOUT)) as client:
                reply = await client.send(self.request(client, url, machine_id, {}), stream=True)
                try:
                    if reply.status_code != 200:
                        raise ApiError(
                            502,
                            f"machine {short_machine_id(machine_id)} refused: {_message(await reply.aread())}",
                        )
                    async for chunk in reply.aiter_raw():
                        sink.write(chunk)
                finally:
                    await reply.aclose()
        except httpx.HTTPError as error:
            raise ApiError(502, self.unreachable(machine_id, endpoint, error)) from None

    async def status(self, request: web.Request, machine_id: str) -> web.Response:
        import httpx

        endpoint = await self.endpoint(request, machine_id)
        try:
            async with self.client(15) as client:
                forwarded = self.request(
                    client, f"{endpoint}{request.path}", machine_id, {"machineID": machine_id}
                )
                reply = await client.send(forwarded)
        except httpx.HTTPError as error:
            raise ApiError(502, self.unreachable(machine_id, endpoint, error)) from None
        return web.Response(status=reply.status_code, body=reply.content, content_type="application/json")

    async def journal(
        self, request: web.Request, machine_id: str, lines: int, follow: bool
    ) -> web.StreamResponse:
        import httpx

        endpoint = await self.endpoint(request, machine_id)
        params = {"lines": str(lines), "follow": str(follow).lower(), "machineID": machine_id}
        response: web.StreamResponse | None = None
        try:
            async with self.client(httpx.Timeout(15, read=None)) as client:
                forwarded = self.request(client, f"{endpoint}{request.path}", machine_id, params)
                reply = await client.send(forwarded, stream=True)
                try:
                    if reply.status_code != 200:
                        return web.Response(
                            status=reply.status_code,
                            body=await reply.aread(),
                            content_type="application/json",
                        )
                    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
                    await response.prepare(request)
                    async for chunk in reply.aiter_bytes():
                        await response.write(chunk)
                finally:
                    await reply.aclose()
        except httpx.HTTPError as error:
            message = self.unreachable(machine_id, endpoint, error)
            if response is None:
                raise ApiError(502, message) from None
            # Lines already went out: the reader learns of the break at the end of the text.
            await response.write(f"\n-- {message} --\n".encode())
        await response.write_eof()
        return response
