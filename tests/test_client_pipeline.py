"""The client sends a multi-unit command's requests back to back on one keep-alive connection."""

from __future__ import annotations

import itertools
import json
import socket
import struct
import threading
from collections.abc import Callable

import pytest

from fleetpy.client import Client, ConnectionFailed


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


def _serve(
    path: str, seen: list, *, taken: Callable[[int], bool] = lambda number: True, together=None
) -> socket.socket:
    """A fake fleetd that answers each request of a connection in turn with its method, target
    and the connection's number; `seen` gets (connection, method, target). It aborts at once
    the connections `taken(number)` refuses, as fleetd's connection guard does at its limit.
    With `together` (an Event), it answers nothing until a second connection is open."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(64)

    def serve(connection: socket.socket, number: int) -> None:
        connection.settimeout(5)
        if together is not None:
            together.wait(5)
        buffer = b""
        with connection:
            while True:
                while b"\r\n\r\n" not in buffer:
                    chunk = connection.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                length = next(
                    int(v) for k, _, v in (line.partition(": ") for line in lines) if k == "Content-Length"
                )
                while len(buffer) < length:
                    buffer += connection.recv(65536)
                buffer = buffer[length:]
                method, target, _ = lines[0].split(" ")
                seen.append((number, method, target))
                body = json.dumps({"method": method, "target": target, "connection": number}).encode()
                connection.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )

    def accept() -> None:
        for number in itertools.count():
            try:
                connection, _ = server.accept()
            except OSError:
                return
            if not taken(number):
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                connection.close()  # a reset, as transport.abort()
                continue
            if number == 1 and together is not None:
                together.set()
            threading.Thread(target=serve, args=(connection, number), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server


def test_a_command_about_many_units_is_answered_over_several_connections_at_once(tmp_path) -> None:
    """fleetd answers one connection's requests one at a time, each waiting on etcd: a command
    about many units spreads them over connections, each unit's requests on one, in order."""
    path = str(tmp_path / "fleet.sock")
    seen: list = []
    together = threading.Event()
    server = _serve(path, seen, together=together)
    names = [f"u{i}.service" for i in range(20)]
    requests = [("GET", f"/fleet/v1/units/{n}", None, None) for n in names]
    requests += [("PUT", f"/fleet/v1/units/{n}", None, {"desiredState": "launched"}) for n in names]
    try:
        with Client(f"unix://{path}", timeout=5) as client:
            answers = [a.json() for a in client.pipeline(requests)]
    finally:
        server.close()
    assert together.is_set()  # a second connection was open before anything was answered
    assert [(a["method"], a["target"]) for a in answers] == [(m, p) for m, p, _, _ in requests]
    connections = {a["connection"] for a in answers}
    assert len(connections) > 1
    for name in names:
        mine = [(c, m) for c, m, t in seen if t.endswith(f"/{name}")]
        assert [m for _, m in mine] == ["GET", "PUT"]  # in order, and on one connection:
        assert len({c for c, _ in mine}) == 1


def _serve_once(path: str, answer: bytes) -> socket.socket:
    """A server that reads one request head and sends `answer` as it is, then closes."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()

    def run() -> None:
        connection, _ = server.accept()
        with connection:
            data = b""
            while b"\r\n\r\n" not in data:
                data += connection.recv(65536)
            connection.sendall(answer)

    threading.Thread(target=run, daemon=True).start()
    return server


def _answer(tmp_path, answer: bytes, call):
    path = str(tmp_path / "fleet.sock")
    server = _serve_once(path, answer)
    try:
        with Client(f"unix://{path}", timeout=2) as client:
            return call(client)
    finally:
        server.close()


def test_a_chunked_stream_is_read_as_lines_across_chunk_boundaries(tmp_path) -> None:
    body = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in (b"one\ntw", b"o\n", b"thr", b"ee"))
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n"
    lines = _answer(tmp_path, answer, lambda c: list(c.unit_journal("a.service")))
    assert lines == ["one", "two", "three"]


def test_an_answer_without_a_length_ends_with_the_connection(tmp_path) -> None:
    answer = b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{"name": "a.service"}'
    unit = _answer(tmp_path, answer, lambda c: c.unit("a.service"))
    assert unit == {"name": "a.service"}


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n",  # something else listens there
        b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{}",  # cut short
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"",
    ],
)
def test_what_is_not_a_whole_http_answer_is_reported_as_fleetd_unreachable(tmp_path, answer) -> None:
    with pytest.raises(ConnectionFailed, match="cannot reach fleetd"):
        _answer(tmp_path, answer, lambda c: c.unit("a.service"))


@pytest.mark.parametrize(
    "taken",
    [lambda number: number == 0, lambda number: number > 0, lambda number: number % 3 == 1],
    ids=["only the first", "all but the first", "every third"],
)
def test_requests_on_connections_fleetd_did_not_take_go_again(tmp_path, taken) -> None:
    """fleetd at its connection limit aborts a connection at once; a burst of fleetctl
    commands, each on several connections, must not fail for it."""
    path = str(tmp_path / "fleet.sock")
    seen: list = []
    server = _serve(path, seen, taken=taken)
    requests = [("GET", f"/fleet/v1/units/u{i}.service", None, None) for i in range(40)]
    try:
        with Client(f"unix://{path}", timeout=5) as client:
            answers = [a.json()["target"] for a in client.pipeline(requests)]
    finally:
        server.close()
    assert answers == [path for _, path, _, _ in requests]
    assert sorted(target for _, _, target in seen) == sorted(answers)  # each answered once
