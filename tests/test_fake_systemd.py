"""FakeSystemd behaves like SystemdManager for the agent's tests."""

from __future__ import annotations

import pytest

from fleetpy.systemd import FakeSystemd, SystemdError

UNIT = "[Service]\nExecStart=/bin/sleep 1000\n"


async def test_start_and_stop_drive_state_and_callbacks() -> None:
    fake = await FakeSystemd.connect()
    events = []
    fake.on_state_change(lambda *event: events.append(event))
    assert await fake.write_unit("hello.service", UNIT)
    await fake.link(["hello.service"])
    assert await fake.unit_state("hello.service") == ("loaded", "inactive", "dead")
    assert await fake.start("hello.service") == "done"
    assert await fake.main_pid("hello.service") > 0
    assert await fake.stop("hello.service") == "done"
    assert events == [
        ("hello.service", "loaded", "active", "running"),
        ("hello.service", "loaded", "inactive", "dead"),
    ]


async def test_fail_next_start_fails_once() -> None:
    fake = FakeSystemd()
    await fake.write_unit("x.service", UNIT)
    await fake.link(["x.service"])
    fake.fail_next_start("x.service")
    assert await fake.start("x.service") == "failed"
    assert await fake.unit_state("x.service") == ("loaded", "failed", "failed")
    assert await fake.start("x.service") == "done"


async def test_remove_units_forgets_stopped_units() -> None:
    fake = FakeSystemd()
    await fake.write_unit("x.service", UNIT)
    await fake.link(["x.service"])
    await fake.start("x.service")
    await fake.stop("x.service")
    await fake.remove_units(["x.service"])
    assert await fake.installed_units() == {}
    assert await fake.unit_state("x.service") == ("not-found", "inactive", "dead")


async def test_names_rewrites_and_unknown_units_match_the_real_manager() -> None:
    fake = FakeSystemd()
    with pytest.raises(ValueError):
        await fake.write_unit("../x.service", UNIT)
    assert await fake.write_unit("x.service", UNIT)
    assert not await fake.write_unit("x.service", UNIT)
    assert await fake.installed_units() == {"x.service": UNIT}
    with pytest.raises(SystemdError):
        await fake.start("missing.service")
    assert await fake.unit_state("missing.service") == ("not-found", "inactive", "dead")
