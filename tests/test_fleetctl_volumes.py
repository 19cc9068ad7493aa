"""fleetctl list-volumes and volume rm end to end against a real API and two real fleetds over
FakeSystemd, as tests/test_fleetctl.py runs them; tests/test_volumes_nodes.py runs volumes on
real systemd --user nodes and a real etcd."""

from __future__ import annotations

import time

from test_fleetctl import M1, M2, fleet, unit_dir  # noqa: F401 - fixtures

GONE = "ffee" + "0" * 28


def _ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def _pending_reason(fleet) -> str | None:  # noqa: F811
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        reason = fleet.call(fleet.registry.pending()).get("db.service")
        if reason:
            return reason
        time.sleep(0.005)
    return None


def test_a_unit_whose_volume_machine_is_gone_is_pending_until_the_volume_is_forgotten(
    fleet,  # noqa: F811
    unit_dir,  # noqa: F811
) -> None:
    assert fleet.call(fleet.registry.claim_volume("data", GONE)) == GONE
    assert _ok(fleet.run("list-volumes", "-l")) == (
        f"VOLUME\tDRIVER\tMACHINE\t\t\t\t\tMOVE\tUNITS\ndata\tlocal\t{GONE}\t-\t-\n"
    )
    (unit_dir / "db.service").write_text(
        "[Service]\nExecStart=/bin/sleep 1000\n[X-Fleet]\nVolume=data\nVolume=logs:shared\n"
    )
    _ok(fleet.run("start", "--no-block", "db.service"))
    reason = _pending_reason(fleet)
    assert reason is not None and "volume data lives on ffee0000..., a machine that is gone" in reason
    out = _ok(fleet.run("list-units", "--fields", "unit,machine,reason", "--no-legend"))
    assert out.startswith("db.service\t-\tno machine fits: volume data lives on ffee0000...")
    assert fleet.call(fleet.registry.assignments()) == []
    assert _ok(fleet.run("list-volumes", "--no-legend")) == (
        "data\tlocal\tffee0000...\t-\tdb.service\nlogs\tshared\t-\t\t-\tdb.service\n"
    )
    # Destroyed first: once forgotten, the unit would start here and make its volume on this disk.
    _ok(fleet.run("destroy", "db.service"))
    assert _ok(fleet.run("volume", "rm", "data")) == "Volume data forgotten\n"
    assert _ok(fleet.run("list-volumes")) == "VOLUME\tDRIVER\tMACHINE\tMOVE\tUNITS\n"
    result = fleet.run("volume", "rm", "data")
    assert result.exit_code != 0 and "volume data not found" in result.output
