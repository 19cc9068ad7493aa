"""The client sends a multi-unit command's requests back to back on one keep-alive connection."""

from __future__ import annotations

import json
import socket
import threading

from fleetpy.client import Client


def _serve_pipelined(path: str, expected: int, seen: dict) -> socket.socket:
    """A server that answers nothing until `expected` requests arrived on one connection."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()

    def run() -> None:
        connection, _ = server.accept()
        seen["connections"] = 1
        connection.settimeout(5)
        data = b""
        while data.count(b"\r\n\r\n") < expected:
            data += connection.recv(65536)
        heads = [chunk for chunk in data.split(b"\r\n\r\n") if chunk]
        seen["targets"] = [head.split(b" ")[1].decode() for head in heads]
        for target in seen["targets"]:
            body = json.dumps({"name": target.rsplit("/", 1)[1], "currentState": "launched"}).encode()
            connection.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
        connection.close()

    threading.Thread(target=run, daemon=True).start()
    return server


def test_many_units_are_asked_for_in_one_round_trip(tmp_path) -> None:
    path = str(tmp_path / "fleet.sock")
    seen: dict = {}
    server = _serve_pipelined(path, 3, seen)
    try:
        with Client(f"unix://{path}", timeout=5) as client:
            units = client.many_units(["a.service", "b.service", "c.service"])
    finally:
        server.close()
    assert seen == {
        "connections": 1,
        "targets": ["/fleet/v1/units/a.service", "/fleet/v1/units/b.service", "/fleet/v1/units/c.service"],
    }
    assert {name: unit["name"] for name, unit in units.items()} == {
        "a.service": "a.service",
        "b.service": "b.service",
        "c.service": "c.service",
    }
