"""DbusManager against a real systemd --user manager in a lab node: what only the real one has
(runtime links, concurrent jobs, foreign units, a closed connection). The rest is in
test_systemd_contract.py."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import pytest
from statelog import StateLog, install

from fleetpy.lab.node import Node
from fleetpy.systemd import DbusManager, SystemdError
from fleetpy.systemd.bus import UNIT_IFACE
from fleetpy.systemd.manager import unit_name_to_path

pytest_plugins = ["fixtures_nodes"]
pytestmark = pytest.mark.integration

SLEEPER = "[Service]\nExecStart=/bin/sleep 1000\n"
FAILING = "[Service]\nType=oneshot\nExecStart=/bin/false\n"


@pytest.fixture
async def manager(systemd_node: Node) -> AsyncIterator[DbusManager]:
    m = await DbusManager.connect(systemd_node.env["DBUS_SESSION_BUS_ADDRESS"], systemd_node.dir / "units")
    yield m
    await m.close()


async def test_sleep_service_reports_running_then_dead_through_callbacks(manager, systemd_node) -> None:
    log = StateLog(manager)
    await install(manager, "hello.service", SLEEPER)
    assert await manager.unit_state("hello.service") == ("loaded", "inactive", "dead")

    assert await manager.start("hello.service") == "done"
    await log.wait_for(("hello.service", "loaded", "active", "running"))
    pid = await manager.main_pid("hello.service")
    assert pid > 0
    os.kill(pid, 0)

    assert await manager.stop("hello.service") == "done"
    await log.wait_for(("hello.service", "loaded", "inactive", "dead"))
    assert await manager.main_pid("hello.service") == 0
    # Each state is reported once, however many PropertiesChanged systemd sends;
    # a transient deactivating/stop-sigterm may show up between the two.
    assert all(a != b for a, b in zip(log.events, log.events[1:], strict=False))
    running = log.events.index(("hello.service", "loaded", "active", "running"))
    assert ("hello.service", "loaded", "inactive", "dead") in log.events[running:]
    assert log.events[-1] == ("hello.service", "loaded", "inactive", "dead")


async def test_remove_units_leaves_no_file_link_or_unit(manager, systemd_node) -> None:
    runtime_units = systemd_node.dir / "run" / "systemd" / "user"
    await install(manager, "hello.service", SLEEPER)
    assert (runtime_units / "hello.service").is_symlink()
    assert await manager.start("hello.service") == "done"
    assert await manager.stop("hello.service") == "done"
    await manager.remove_units(["hello.service"])

    assert await manager.installed_units() == {}
    assert not (manager.unit_dir / "hello.service").exists()
    assert not (runtime_units / "hello.service").exists()
    assert await manager.unit_state("hello.service") == ("not-found", "inactive", "dead")
    listed = systemd_node.run(["systemctl", "--user", "list-units", "--all", "--plain"]).stdout
    assert "hello.service" not in listed


async def test_rewriting_the_same_content_changes_nothing(manager) -> None:
    assert await manager.write_unit("hello.service", SLEEPER)
    mtime = (manager.unit_dir / "hello.service").stat().st_mtime_ns
    assert not await manager.write_unit("hello.service", SLEEPER)
    assert (manager.unit_dir / "hello.service").stat().st_mtime_ns == mtime
    assert await manager.write_unit("hello.service", FAILING)
    assert await manager.installed_units() == {"hello.service": FAILING}


async def test_linking_units_systemd_never_loaded_does_not_reload_it(manager, monkeypatch) -> None:
    """A reload re-reads every unit and stalls systemd: it is for units it holds an old copy of."""
    calls = []
    real = manager._manager

    async def counted(member, *args):
        calls.append(member)
        return await real(member, *args)

    monkeypatch.setattr(manager, "_manager", counted)
    await install(manager, "new1.service", SLEEPER)
    assert await manager.write_unit("new2.service", SLEEPER)
    assert await manager.write_unit("new3.service", SLEEPER)
    await manager.link(["new2.service", "new3.service"])
    assert "Reload" not in calls
    assert await manager.start("new3.service") == "done"

    assert await manager.write_unit("new3.service", FAILING)  # it runs: systemd holds the old copy
    await manager.link(["new3.service"])
    assert calls.count("Reload") == 1
    await manager.stop("new3.service")


async def test_signals_about_units_not_ours_are_left_undecoded(manager) -> None:
    """systemd sends PropertiesChanged for every unit, the slice and targets ours join among
    them; decoding those was most of an agent's CPU in a burst of starts."""
    bodies: dict[str, list] = {}

    def seen(message) -> None:
        if message.member == "PropertiesChanged":
            bodies.setdefault(message.path, []).append(message.body)

    manager._bus.add_message_handler(seen)
    await install(manager, "mine.service", SLEEPER)
    assert await manager.start("mine.service") == "done"
    ours = unit_name_to_path("mine.service")
    for _ in range(100):
        if len(bodies) > 1 and ours in bodies:
            break
        await asyncio.sleep(0.02)
    assert bodies[ours] and all(body[0] == UNIT_IFACE for body in bodies[ours])
    others = [body for path, found in bodies.items() if path != ours for body in found]
    assert others and all(body == [None, None, None] for body in others)
    await manager.stop("mine.service")


async def test_twenty_concurrent_starts_all_get_their_job_result(manager) -> None:
    names = [f"sleeper{i}.service" for i in range(20)]
    for name in names:
        assert await manager.write_unit(name, SLEEPER)
    await manager.link(names)
    # JobRemoved for a fast job can beat StartUnit's reply; a lost one would hang here.
    results = await asyncio.wait_for(asyncio.gather(*(manager.start(n) for n in names)), 20)
    assert results == ["done"] * 20
    states = await asyncio.gather(*(manager.unit_state(n) for n in names))
    assert set(states) == {("loaded", "active", "running")}
    results = await asyncio.wait_for(asyncio.gather(*(manager.stop(n) for n in names)), 20)
    assert results == ["done"] * 20


async def test_units_not_in_unit_dir_raise_no_callbacks(manager, systemd_node) -> None:
    log = StateLog(manager)
    result = systemd_node.run(["systemd-run", "--user", "--unit=foreign", "sleep", "1000"])
    assert result.returncode == 0, result.stderr
    await install(manager, "ours.service", SLEEPER)
    assert await manager.start("ours.service") == "done"
    await log.wait_for(("ours.service", "loaded", "active", "running"))
    assert {event[0] for event in log.events} == {"ours.service"}


async def test_calls_after_the_connection_closed_raise_instead_of_hanging(manager) -> None:
    await manager.close()
    with pytest.raises(SystemdError, match="closed"):
        await asyncio.wait_for(manager.unit_state("hello.service"), 5)


async def _start_and_see_it_run(manager: DbusManager, name: str) -> None:
    """Start `name` and wait for its running state through the callbacks (so signals flow)."""
    log = StateLog(manager)
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        try:
            assert await manager.start(name) == "done"
            break
        except SystemdError:  # systemd may need a moment to be back on the bus
            assert asyncio.get_running_loop().time() < deadline, "systemd never answered again"
            await asyncio.sleep(0.2)
    await log.wait_for((name, "loaded", "active", "running"), timeout=10)


async def test_a_lost_bus_connection_is_made_again_with_its_signals(manager, systemd_node) -> None:
    await install(manager, "after.service", SLEEPER)
    shown = systemd_node.run(["systemctl", "--user", "show", "-p", "MainPID", "--value", "dbus.service"])
    os.kill(int(shown.stdout), signal.SIGTERM)  # the node's dbus-daemon: our connection ends
    await _start_and_see_it_run(manager, "after.service")


async def test_a_change_missed_while_the_bus_was_away_is_reported_after(manager, systemd_node) -> None:
    log = StateLog(manager)
    await install(manager, "victim.service", SLEEPER)
    assert await manager.start("victim.service") == "done"
    await log.wait_for(("victim.service", "loaded", "active", "running"))
    victim = await manager.main_pid("victim.service")
    shown = systemd_node.run(["systemctl", "--user", "show", "-p", "MainPID", "--value", "dbus.service"])
    bus_daemon = int(shown.stdout)
    os.kill(bus_daemon, signal.SIGSTOP)  # systemd's signals about what follows queue in it...
    os.kill(victim, signal.SIGKILL)
    await asyncio.sleep(0.3)
    os.kill(bus_daemon, signal.SIGKILL)  # ...and are lost with it
    await log.wait_for(("victim.service", "loaded", "failed", "failed"), timeout=15)
