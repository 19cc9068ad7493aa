"""The API's errors, mapped to HTTP status codes here, once.

Unit errors are 400, missing records 404, conflicts 409, an unreachable etcd 503; every error
body is {"error": {"code", "message"}}.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from fleetpy.registry import Conflict, NoQuorum, NotFound, Unavailable
from fleetpy.unit import UnitError

log = logging.getLogger(__name__)


# The error's "reason" when etcd is what failed (a fleetpy field beside fleet's code and message),
# so that clients can tell "fleetd answered but etcd is unreachable" from "fleetd is unreachable".
ETCD_UNREACHABLE = "etcdUnreachable"


# What an etcd without quorum means for the cluster, after the store's account of the members.
NO_QUORUM_CONSEQUENCES = (
    "units already running keep running, but nothing is scheduled, started, stopped or changed "
    "until then; fleetd keeps retrying"
)


def etcd_unavailable(error: Unavailable) -> str:
    """The 503's message for an etcd that failed a request (after the store's own retries)."""
    return f"{error}; {NO_QUORUM_CONSEQUENCES}" if isinstance(error, NoQuorum) else str(error)


class ApiError(Exception):
    def __init__(self, status: int, message: str, reason: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


def error_response(status: int, message: str, reason: str | None = None) -> web.Response:
    error: dict = {"code": status, "message": message}
    if reason:
        error["reason"] = reason
    return web.json_response({"error": error}, status=status)


@web.middleware
async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        return error_response(error.status, error.message, error.reason)
    except UnitError as error:
        return error_response(400, str(error))
    except NotFound as error:
        return error_response(404, str(error))
    except Conflict as error:
        return error_response(409, str(error))
    except Unavailable as error:
        return error_response(503, etcd_unavailable(error), ETCD_UNREACHABLE)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        messages = {
            404: f"no such API path {request.path}",
            405: f"method {request.method} is not allowed on {request.path}",
        }
        return error_response(error.status, messages.get(error.status, error.text or error.reason))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        # The traceback goes to fleetd's log; clients only learn that something broke.
        log.exception("API request %s %s failed", request.method, request.path)
        return error_response(500, "internal error in fleetd; see its log for details")
