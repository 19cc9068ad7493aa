"""The OpenAPI 3 description of the routes fleetd really serves, at /fleet/v1/openapi.json.

It describes fleet's /fleet/v1 (what Go fleetctl speaks) and fleetpy's /fleetpy/v1 extensions,
with their bodies and every status code each route may answer; the schema test (schemathesis)
fuzzes the API against it.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from fleetpy.registry import DESIRED_STATES


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    meaning = {
        400: "the request is wrong; the message says what to change",
        401: "missing or wrong credentials (TCP only)",
        403: "only the machine a volume moves to may fetch its data",
        404: "no such unit, machine or path",
        405: "method not allowed on this path",
        408: "the request body did not arrive in time",
        409: "conflicts with what exists; the message says why",
        413: "request body too large",
        502: "the machine running the unit could not be asked",
        503: "etcd is unreachable (reason etcdUnreachable), or systemd is not available here",
    }
    return {str(code): _json(_ref("Error"), meaning[code]) for code in sorted({401, 405, 503, *codes})}


_VOLUME_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_VOLUME = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "driver": {
            "type": "string",
            "enum": ["local", "shared"],
            "description": "local: lives on one machine; shared: on the shared volume directory of every machine",
        },
        "machineID": {
            "type": ["string", "null"],
            "description": "where a local volume lives; null for shared",
        },
        "units": {
            "type": "array",
            "items": {"type": "string"},
            "description": "listVolumes: the submitted units that name the volume",
        },
        "move": {
            "type": ["object", "null"],
            "description": "the last move: stopping, copying, done or failed (with the reason)",
            "properties": {
                "source": {"type": "string"},
                "target": {"type": "string"},
                "state": {"type": "string", "enum": ["stopping", "copying", "done", "failed"]},
                "started": {"type": "number"},
                "finished": {"type": "number"},
                "reason": {"type": "string"},
                "bytes": {"type": "integer"},
            },
        },
    },
}
_VOLUME_MOVED = {
    "type": "object",
    "properties": {**_VOLUME["properties"], "started": {"type": "boolean"}},
}


def _page_token() -> dict:
    return {
        "name": "nextPageToken",
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": "the nextPageToken of the previous page",
    }


_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "unit name, e.g. web@1.service",
    "example": "hello.service",
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "integer"},
                    "message": {"type": "string"},
                    "reason": {"type": "string", "description": "fleetpy: etcdUnreachable"},
                },
            }
        },
    },
    "UnitOption": {
        "type": "object",
        "required": ["section", "name", "value"],
        "properties": {
            "section": {"type": "string"},
            "name": {"type": "string"},
            "value": {"type": "string"},
        },
    },
    "Unit": {
        "type": "object",
        "required": ["name", "options", "desiredState", "currentState", "global"],
        "properties": {
            "name": {"type": "string"},
            "options": {"type": "array", "items": _ref("UnitOption")},
            "desiredState": {"type": "string", "enum": list(DESIRED_STATES)},
            "currentState": {"type": "string", "enum": list(DESIRED_STATES)},
            "machineID": {"type": "string"},
            "global": {"type": "boolean", "description": "fleetpy: [X-Fleet] Global=true"},
        },
    },
    "UnitRequest": {
        "type": "object",
        "example": {
            "desiredState": "launched",
            "options": [{"section": "Service", "name": "ExecStart", "value": "/bin/sleep 1000"}],
        },
        "properties": {
            "name": {"type": "string"},
            "desiredState": {"type": "string", "enum": ["", *DESIRED_STATES]},
            "options": {"type": "array", "items": _ref("UnitOption")},
        },
    },
    "UnitState": {
        "type": "object",
        "required": ["name", "machineID"],
        "properties": {
            "name": {"type": "string"},
            "hash": {"type": "string"},
            "machineID": {"type": "string"},
            "systemdLoadState": {"type": "string"},
            "systemdActiveState": {"type": "string"},
            "systemdSubState": {"type": "string"},
            "reason": {"type": "string", "description": "fleetpy: why the unit failed or cannot load"},
            "health": {
                "type": "object",
                "description": "fleetpy: what the unit's [X-Fleet] health check found, while it is active",
                "required": ["status"],
                "properties": {
                    "status": {"type": "string", "enum": ["starting", "healthy", "unhealthy"]},
                    "failures": {"type": "integer", "description": "failed checks in a row"},
                    "restarts": {"type": "integer", "description": "restarts for failed checks"},
                    "message": {"type": "string", "description": "what the last failed check said"},
                },
            },
        },
    },
    "Machine": {
        "type": "object",
        "required": ["id", "primaryIP", "metadata"],
        "properties": {
            "id": {"type": "string"},
            "primaryIP": {"type": "string"},
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
            "cordoned": {"type": "boolean", "description": "fleetpy: drained, takes no new units"},
            "capacity": {
                "type": "object",
                "description": "fleetpy: what units may reserve: cpus, memory (bytes)",
                "additionalProperties": {"type": "number"},
            },
            "facts": {
                "type": "object",
                "description": "fleetpy: live facts (os, kernel, load1, memory_free, facts.d output...)",
                "additionalProperties": {"type": ["string", "number"]},
            },
            "sharedVolumes": {
                "type": "boolean",
                "description": "fleetpy: has a shared volume directory, runs units with Volume=NAME:shared",
            },
        },
    },
    "MetadataOperation": {
        "type": "object",
        "required": ["op", "path"],
        "properties": {
            "op": {"type": "string", "enum": ["add", "remove", "replace"]},
            "path": {"type": "string", "description": "/<machine id>/metadata/<key>"},
            "value": {"type": "string"},
        },
    },
}


def _list_of(key: str, item: str) -> dict:
    return {
        "type": "object",
        "required": [key],
        "properties": {key: {"type": "array", "items": _ref(item)}, "nextPageToken": {"type": "string"}},
    }


def _paths() -> dict[str, Any]:
    no_content = {"description": "done"}
    return {
        "/fleet/v1/discovery": {
            "get": {"operationId": "discovery", "responses": {"200": _json({"type": "object"}, "fleet's")}}
        },
        "/fleet/v1/openapi.json": {
            "get": {
                "operationId": "openapi",
                "responses": {"200": _json({"type": "object"}, "this document")},
            }
        },
        "/fleet/v1/units": {
            "get": {
                "operationId": "listUnits",
                "parameters": [_page_token()],
                "responses": {"200": _json(_list_of("units", "Unit"), "one page of units"), **_errors(400)},
            }
        },
        "/fleet/v1/units/{name}": {
            "parameters": [_NAME],
            "get": {
                "operationId": "getUnit",
                "responses": {"200": _json(_ref("Unit"), "the unit"), **_errors(400, 404)},
            },
            "put": {
                "operationId": "setUnit",
                "description": "create (201), replace (201) or set the desired state (204), as fleet",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("UnitRequest")}},
                },
                "responses": {"201": no_content, "204": no_content, **_errors(400, 408, 409, 413)},
            },
            "delete": {
                "operationId": "deleteUnit",
                "responses": {"204": no_content, **_errors(400, 404)},
            },
        },
        "/fleet/v1/state": {
            "get": {
                "operationId": "listUnitStates",
                "parameters": [
                    _page_token(),
                    {"name": "machineID", "in": "query", "required": False, "schema": {"type": "string"}},
                    {"name": "unitName", "in": "query", "required": False, "schema": {"type": "string"}},
                ],
                "responses": {"200": _json(_list_of("states", "UnitState"), "one page"), **_errors(400)},
            }
        },
        "/fleet/v1/state/{name}": {
            "parameters": [_NAME],
            "get": {
                "operationId": "getUnitState",
                "responses": {"200": _json(_ref("UnitState"), "one machine's state"), **_errors(400, 404)},
            },
        },
        "/fleet/v1/machines": {
            "get": {
                "operationId": "listMachines",
                "parameters": [_page_token()],
                "responses": {"200": _json(_list_of("machines", "Machine"), "one page"), **_errors(400)},
            },
            "patch": {
                "operationId": "patchMachines",
                "description": "JSON Patch of machine metadata, validated whole before any is applied",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"type": "array", "items": _ref("MetadataOperation")}}
                    },
                },
                "responses": {"204": no_content, **_errors(400, 404, 408, 413)},
            },
        },
        **_extensions(),
    }


def _extensions() -> dict[str, Any]:
    def route(operation: str, ok: dict, *codes: int, parameters: list | None = None) -> dict:
        get = {"operationId": operation, "responses": {"200": ok, **_errors(400, 404, *codes)}}
        if parameters:
            get["parameters"] = parameters
        return {"parameters": [_NAME], "get": get}

    named = {"name": {"type": "string"}}
    machine = {"name": "machineID", "in": "query", "required": False, "schema": {"type": "string"}}
    return {
        # `follow=true` turns the answer into an endless stream of JSON lines, so it is left out
        # of the document (and of fuzzing); see README "Events".
        "/fleetpy/v1/events": {
            "get": {
                "operationId": "events",
                "parameters": [
                    {"name": "unit", "in": "query", "required": False, "schema": {"type": "string"}},
                    machine,
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 0},
                    },
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {"events": {"type": "array", "items": {"type": "object"}}},
                        },
                        "recent events, oldest first",
                    ),
                    **_errors(400),
                },
            }
        },
        "/fleetpy/v1/units/{name}/pending": route(
            "pending",
            _json({"type": "object", "properties": {**named, "reason": {"type": ["string", "null"]}}}, "why"),
        ),
        "/fleetpy/v1/units/{name}/explain": route(
            "explain",
            _json(
                {
                    "type": "object",
                    "properties": {**named, "lines": {"type": "array", "items": {"type": "string"}}},
                },
                "the scheduler's steps for the unit",
            ),
        ),
        "/fleetpy/v1/units/{name}/status": route(
            "status",
            _json(
                {"type": "object", "properties": {**named, "status": {"type": "string"}}}, "systemctl status"
            ),
            502,
            parameters=[machine],
        ),
        "/fleetpy/v1/wait": {
            "get": {
                "operationId": "wait",
                "description": "a long poll until the units reach the state (fleetd may answer sooner "
                "than timeout, never later than its registry deadline)",
                "parameters": [
                    {
                        "name": "unit",
                        "in": "query",
                        "required": True,
                        "style": "form",
                        "explode": True,
                        "schema": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                    },
                    {
                        "name": "state",
                        "in": "query",
                        "required": True,
                        "schema": {"enum": list(DESIRED_STATES)},
                    },
                    {
                        "name": "timeout",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "number", "minimum": 0},
                    },
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["units", "failed", "missing", "done"],
                            "properties": {
                                "units": {"type": "array", "items": _ref("Unit")},
                                "failed": {"type": "object", "additionalProperties": {"type": "string"}},
                                "missing": {"type": "array", "items": {"type": "string"}},
                                "done": {"type": "boolean"},
                            },
                        },
                        "the units as they are when they got there, or when the time was up",
                    ),
                    **_errors(400),
                },
            }
        },
        "/fleetpy/v1/units/{name}/journal": route(
            "journal",
            {"description": "journal lines", "content": {"text/plain": {"schema": {"type": "string"}}}},
            502,
            parameters=[
                machine,
                {
                    "name": "lines",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 0},
                },
                {"name": "follow", "in": "query", "required": False, "schema": {"type": "boolean"}},
            ],
        ),
        "/fleetpy/v1/units/{name}/plan": {
            "parameters": [_NAME],
            "post": {
                "operationId": "plan",
                "description": "where the unit would go if started now, and why; writes nothing. "
                "Without options, the submitted unit's file (or its template's) is planned",
                "requestBody": {
                    "required": False,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {"options": {"type": "array", "items": _ref("UnitOption")}},
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {**named, "lines": {"type": "array", "items": {"type": "string"}}},
                        },
                        "the scheduler's steps for the unit",
                    ),
                    **_errors(400, 404, 408, 413),
                },
            },
        },
        "/fleetpy/v1/machines/{id}/cordon": {
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "put": {
                "operationId": "drainMachine",
                "description": "drain: keep new units off the machine and move its units elsewhere",
                "responses": {"204": {"description": "done"}, **_errors(404)},
            },
            "delete": {
                "operationId": "uncordonMachine",
                "description": "let a drained machine take units again",
                "responses": {"204": {"description": "done"}, **_errors(404)},
            },
        },
        "/fleetpy/v1/volumes": {
            "get": {
                "operationId": "listVolumes",
                "description": "every local volume ([X-Fleet] Volume=), the machine it lives on and its last "
                "move, and every shared volume (Volume=NAME:shared) a submitted unit names, with those units",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "volumes": {
                                    "type": "array",
                                    "items": _VOLUME,
                                }
                            },
                        },
                        "the volumes, by name",
                    )
                },
            },
        },
        "/fleetpy/v1/volumes/{name}": {
            "parameters": [_VOLUME_NAME],
            "get": {
                "operationId": "getVolume",
                "description": "a volume, the machine it lives on and its last move, as etcd has it now",
                "responses": {"200": _json(_VOLUME, "the volume"), **_errors(400, 404)},
            },
            "delete": {
                "operationId": "forgetVolume",
                "description": "forget where a volume lives: its units may start afresh elsewhere",
                "responses": {"204": {"description": "done"}, **_errors(400, 404, 409)},
            },
        },
        "/fleetpy/v1/volumes/{name}/move": {
            "parameters": [_VOLUME_NAME],
            "post": {
                "operationId": "moveVolume",
                "description": "move a local volume to another machine: its units stop, its data is copied "
                "from its machine's fleetd to the target's, and its units start there; follow the move "
                "with getVolume",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {"machineID": {"type": "string"}},
                                "required": ["machineID"],
                            }
                        }
                    },
                },
                "responses": {
                    "202": _json(_VOLUME_MOVED, "the move started"),
                    "200": _json(_VOLUME_MOVED, "the volume lives on that machine already: nothing to do"),
                    **_errors(400, 404, 409),
                },
            },
        },
        "/fleetpy/v1/volumes/{name}/data": {
            "parameters": [_VOLUME_NAME],
            "get": {
                "operationId": "volumeData",
                "description": "the volume's data as a tar stream: for the fleetd of the machine it moves "
                "to only (a peer request), while the move copies it from this machine",
                "responses": {
                    "200": {"description": "the tar stream", "content": {"application/x-tar": {}}},
                    **_errors(400, 403, 409),
                },
            },
        },
    }


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fleetd API",
            "version": "v1",
            "description": "fleet's /fleet/v1 API, and fleetpy's /fleetpy/v1 extensions",
        },
        "paths": _paths(),
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"token": []}, {}],
    }


async def serve_document(request: web.Request) -> web.Response:
    return web.json_response(document())
