"""FakeSystemd's own test hooks; tests/test_systemd_contract.py holds it to the real manager's behaviour."""

from __future__ import annotations

from fleetpy.systemd import FakeSystemd

UNIT = "[Service]\nExecStart=/bin/sleep 1000\n"


async def test_fail_next_start_fails_once() -> None:
    fake = FakeSystemd()
    await fake.write_unit("x.service", UNIT)
    await fake.link(["x.service"])
    fake.fail_next_start("x.service")
    assert await fake.start("x.service") == "failed"
    assert await fake.unit_state("x.service") == ("loaded", "failed", "failed")
    assert await fake.start("x.service") == "done"
