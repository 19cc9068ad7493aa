"""The bus connection's own pieces that need no systemd: its EAGAIN-safe socket."""

from __future__ import annotations

import socket

from fleetpy.systemd.bus import _EagainSafeSocket


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
