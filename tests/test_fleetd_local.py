"""fleetd's status/journal source for each --systemd-bus value, against a real user manager."""

from __future__ import annotations

import asyncio

from fleetpy.fleetd.main import local_unit_info

pytest_plugins = ["fixtures_nodes"]


def test_a_bus_address_reaches_that_manager(systemd_node, monkeypatch):
    # As fleetd started outside the node would be: none of the node's own variables.
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    info = local_unit_info(systemd_node.env["DBUS_SESSION_BUS_ADDRESS"])
    status = asyncio.run(info.status("dbus.socket"))
    assert "dbus.socket" in status and "active (running)" in status, status
    assert str(systemd_node.dir) in status  # the node's socket, not another manager's


def test_user_and_system_keep_their_meaning():
    assert local_unit_info("user").status_argv("a.service")[:2] == ["systemctl", "--user"]
    assert local_unit_info("system").status_argv("a.service")[:2] == ["systemctl", "--system"]
