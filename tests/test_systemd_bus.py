"""The bus connection's own pieces that need no systemd: its EAGAIN-safe socket, unit paths."""

from __future__ import annotations

import socket

from fleetpy.systemd.bus import _EagainSafeSocket
from fleetpy.systemd.manager import unit_name_to_path, unit_path_to_name


def test_a_full_socket_buffer_reads_as_nothing_sent_not_an_error():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        safe = _EagainSafeSocket(ours)
        sent = [safe.send(b"x" * 65536) for _ in range(64)]
        # The peer reads nothing, so the buffer fills: dbus-next's writer then sees 0 and waits
        # for the socket to become writable instead of dropping the connection.
        assert sent[-1] == 0 and sum(sent) > 0
        assert safe.fileno() == ours.fileno()


def test_a_unit_name_and_its_object_path_turn_into_each_other() -> None:
    assert unit_name_to_path("hello.service") == "/org/freedesktop/systemd1/unit/hello_2eservice"
    # A leading digit is escaped too, as systemd's bus_label_escape does.
    assert unit_name_to_path("1a-b@c:d.service") == (
        "/org/freedesktop/systemd1/unit/_31a_2db_40c_3ad_2eservice"
    )
    for name in ("hello.service", "1a-b@c:d.service", "web@8080.socket", "x\\x2dy.service"):
        assert unit_path_to_name(unit_name_to_path(name)) == name
