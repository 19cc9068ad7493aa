"""One contract for every SystemdManager: the real one (a systemd --user manager over D-Bus in a
lab node) and FakeSystemd run the same tests, so the agent's fast tests mean something."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator

import pytest
from statelog import StateLog, install

from fleetpy.systemd import UNKNOWN_STATE, DbusManager, FakeSystemd, SystemdError, SystemdManager

pytest_plugins = ["fixtures_nodes"]
pytestmark = pytest.mark.integration

SLEEPER = "[Service]\nExecStart=/bin/sleep 1000\n"
FAILING = "[Service]\nType=oneshot\nExecStart=/bin/false\n"
TYPO = "[Service]\nExecStrat=/bin/sleep 1000\n"  # no ExecStart=: systemd refuses to load it


@pytest.fixture(params=["dbus", "fake"])
async def manager(request, node_factory) -> AsyncIterator[SystemdManager]:
    if request.param == "dbus":
        node = node_factory("contract")
        m: SystemdManager = await DbusManager.connect(
            node.env["DBUS_SESSION_BUS_ADDRESS"], node.dir / "units"
        )
    else:
        m = await FakeSystemd.connect()
    yield m
    await m.close()


async def test_start_and_stop_report_each_state_once(manager) -> None:
    log = StateLog(manager)
    await install(manager, "hello.service", SLEEPER)
    assert await manager.unit_state("hello.service") == ("loaded", "inactive", "dead")
    assert await manager.start("hello.service") == "done"
    await log.wait_for(("hello.service", "loaded", "active", "running"))
    assert await manager.main_pid("hello.service") > 0
    assert await manager.failure_reason("hello.service") == ""
    assert await manager.stop("hello.service") == "done"
    await log.wait_for(("hello.service", "loaded", "inactive", "dead"))
    assert await manager.main_pid("hello.service") == 0
    assert all(a != b for a, b in zip(log.events, log.events[1:], strict=False))
    running = log.events.index(("hello.service", "loaded", "active", "running"))
    assert ("hello.service", "loaded", "inactive", "dead") in log.events[running:]


async def test_unit_states_answers_for_many_units_at_once(manager) -> None:
    await install(manager, "up.service", SLEEPER)
    await install(manager, "down.service", SLEEPER)
    assert await manager.start("up.service") == "done"
    states = await manager.unit_states(["up.service", "down.service", "nothing.service"])
    assert states == {
        "up.service": ("loaded", "active", "running"),
        "down.service": ("loaded", "inactive", "dead"),
        "nothing.service": UNKNOWN_STATE,
    }
    assert await manager.unit_states([]) == {}
    await manager.stop("up.service")


async def test_a_unit_that_fails_at_once_reports_systemds_reason(manager) -> None:
    await install(manager, "broken.service", FAILING)
    assert await manager.start("broken.service") == "failed"
    assert await manager.unit_state("broken.service") == ("loaded", "failed", "failed")
    assert (
        await manager.failure_reason("broken.service") == "exit-code: the main process exited with status 1"
    )
    # Stopping a failed unit clears its failure: a later start is not read as failing again.
    assert await manager.stop("broken.service") == "done"
    assert await manager.unit_state("broken.service") == ("loaded", "inactive", "dead")
    assert await manager.failure_reason("broken.service") == ""


async def test_a_unit_that_cannot_load_is_refused_with_its_load_error(manager) -> None:
    await install(manager, "typo.service", TYPO)
    with pytest.raises(SystemdError, match="bad unit file setting"):
        await manager.start("typo.service")
    assert await manager.unit_state("typo.service") == ("bad-setting", "inactive", "dead")
    assert await manager.failure_reason("typo.service") == (
        "bad-setting: Unit typo.service has a bad unit file setting."
    )


async def test_remove_units_forgets_files_and_units(manager) -> None:
    await install(manager, "hello.service", SLEEPER)
    assert await manager.start("hello.service") == "done"
    assert await manager.stop("hello.service") == "done"
    await manager.remove_units(["hello.service"])
    assert await manager.installed_units() == {}
    assert await manager.unit_state("hello.service") == UNKNOWN_STATE


async def test_remove_units_forgets_a_failed_unit(manager) -> None:
    await install(manager, "broken.service", FAILING)
    assert await manager.start("broken.service") == "failed"
    await manager.remove_units(["broken.service"])
    assert await manager.unit_state("broken.service") == UNKNOWN_STATE


async def test_remove_units_tolerates_units_never_linked(manager) -> None:
    await install(manager, "linked.service", SLEEPER)
    assert await manager.write_unit("written.service", SLEEPER)
    await manager.remove_units(["never.service", "written.service", "linked.service"])
    assert await manager.installed_units() == {}
    assert await manager.unit_state("linked.service") == UNKNOWN_STATE


async def test_rewriting_the_same_content_changes_nothing(manager) -> None:
    assert await manager.write_unit("hello.service", SLEEPER)
    assert not await manager.write_unit("hello.service", SLEEPER)
    assert await manager.write_unit("hello.service", FAILING)
    assert await manager.installed_units() == {"hello.service": FAILING}


async def test_new_content_of_a_unit_systemd_ran_is_what_starts_after_link(manager) -> None:
    await install(manager, "hello.service", SLEEPER)
    assert await manager.start("hello.service") == "done"
    assert await manager.stop("hello.service") == "done"
    assert await manager.write_unit("hello.service", FAILING)
    await manager.link(["hello.service"])
    assert await manager.start("hello.service") == "failed"


async def test_a_unit_asked_about_before_its_file_was_linked_starts_after_link(manager) -> None:
    assert await manager.unit_state("later.service") == UNKNOWN_STATE
    await install(manager, "later.service", SLEEPER)
    assert await manager.unit_state("later.service") == ("loaded", "inactive", "dead")
    assert await manager.start("later.service") == "done"
    await manager.stop("later.service")


async def test_starting_a_unit_never_linked_raises(manager) -> None:
    with pytest.raises(SystemdError):
        await manager.start("missing.service")
    assert await manager.unit_state("missing.service") == UNKNOWN_STATE
    assert await manager.main_pid("missing.service") == 0


@pytest.mark.parametrize("name", ["../evil.service", "a/b.service", "a b.service", ""])
async def test_a_bad_unit_name_raises_before_anything_is_written(manager, name) -> None:
    with pytest.raises(ValueError, match="unit name|unit type"):
        await manager.write_unit(name, SLEEPER)
    assert await manager.installed_units() == {}


@pytest.mark.parametrize("implementation", [DbusManager, FakeSystemd])
def test_each_implementation_has_every_method_of_the_protocol_with_its_parameters(implementation) -> None:
    members = [n for n, v in vars(SystemdManager).items() if callable(v) and not n.startswith("_")]
    assert members, "the protocol lists no methods"
    for name in members:
        ours = inspect.signature(getattr(implementation, name))
        wanted = inspect.signature(getattr(SystemdManager, name))
        assert list(ours.parameters) == list(wanted.parameters), f"{implementation.__name__}.{name}"
        assert inspect.iscoroutinefunction(getattr(implementation, name)) == inspect.iscoroutinefunction(
            getattr(SystemdManager, name)
        ), f"{implementation.__name__}.{name}"
