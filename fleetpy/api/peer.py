"""Passing a status or journal request on to the fleetd of the machine that runs the unit."""

from __future__ import annotations

import httpx
from aiohttp import web

from fleetpy.api.errors import ApiError
from fleetpy.registry.aio import AsyncRegistry

# Marks a request one fleetd passed to another, so a stale schedule cannot bounce it around.
FORWARDED_HEADER = "X-Fleetpy-Forwarded"


class Peers:
    """Forwards requests to other machines' APIs, with this cluster's peer token."""

    def __init__(self, registry: AsyncRegistry, machine_id: str, token: str | None):
        self.registry = registry
        self.machine_id = machine_id
        self.token = token

    async def endpoint(self, request: web.Request, machine_id: str) -> str:
        """The API endpoint of another machine, after checking the request may go there."""
        if request.headers.get(FORWARDED_HEADER):
            raise ApiError(
                502,
                f"request was forwarded to {self.machine_id}, which does not run "
                "the unit; the schedule changed meanwhile, try again",
            )
        machine = next((m for m in await self.registry.machines() if m.id == machine_id), None)
        if machine is None:
            raise ApiError(502, f"machine {machine_id} is no longer alive")
        if not machine.api_endpoint:
            raise ApiError(
                502, f"machine {machine_id[:8]}... has no API endpoint; start its fleetd with --api-listen"
            )
        return machine.api_endpoint.rstrip("/")

    def headers(self) -> dict[str, str]:
        headers = {FORWARDED_HEADER: self.machine_id}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    async def status(self, request: web.Request, machine_id: str) -> web.Response:
        endpoint = await self.endpoint(request, machine_id)
        try:
            async with httpx.AsyncClient(timeout=15) as client:
                reply = await client.get(
                    f"{endpoint}{request.path}", headers=self.headers(), params={"machineID": machine_id}
                )
        except httpx.HTTPError as error:
            raise ApiError(502, f"cannot reach machine {machine_id[:8]}... at {endpoint}: {error}") from None
        return web.Response(status=reply.status_code, body=reply.content, content_type="application/json")

    async def journal(
        self, request: web.Request, machine_id: str, lines: int, follow: bool
    ) -> web.StreamResponse:
        endpoint = await self.endpoint(request, machine_id)
        params = {"lines": str(lines), "follow": str(follow).lower(), "machineID": machine_id}
        response: web.StreamResponse | None = None
        try:
            async with (
                httpx.AsyncClient(timeout=httpx.Timeout(15, read=None)) as client,
                client.stream(
                    "GET", f"{endpoint}{request.path}", params=params, headers=self.headers()
                ) as reply,
            ):
                if reply.status_code != 200:
                    return web.Response(
                        status=reply.status_code, body=await reply.aread(), content_type="application/json"
                    )
                response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
                await response.prepare(request)
                async for chunk in reply.aiter_bytes():
                    await response.write(chunk)
        except httpx.HTTPError as error:
            message = f"cannot reach machine {machine_id[:8]}... at {endpoint}: {error}"
            if response is None:
                raise ApiError(502, message) from None
            # Lines already went out: the reader learns of the break at the end of the text.
            await response.write(f"\n-- {message} --\n".encode())
        await response.write_eof()
        return response
