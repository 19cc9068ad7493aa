"""fleetctl drain, uncordon, plan and scale end to end against a real API and two real fleetds
(agent and engine) over FakeSystemd, as tests/test_fleetctl.py runs them; the lab versions are
in tests/test_drain_lab.py."""

from __future__ import annotations

from test_fleetctl import M1, M2, fleet, unit_dir  # noqa: F401 - fixtures

from fleetpy.engine import engine


def _ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def test_drain_moves_units_and_uncordon_takes_units_again(fleet, unit_dir, monkeypatch):  # noqa: F811
    # How often the engine looks whether a moved unit's new copy runs: not what is tested here.
    monkeypatch.setattr(engine, "HANDOVER_POLL", 0.002)
    _ok(fleet.run("start", "hello.service"))
    assert fleet.call(fleet.registry.assignments())[0].machine_id == M1
    out = _ok(fleet.run("drain", M1[:6]))
    assert out == "Unit hello.service moved to 2c9a1b3e.../10.0.0.2\nMachine 113f16a7.../10.0.0.1 drained\n"
    assert [a.machine_id for a in fleet.call(fleet.registry.assignments())] == [M2]
    assert "10.0.0.1\tdisk=ssd,region=us (drained)\n" in _ok(fleet.run("list-machines"))
    assert _ok(fleet.run("list-machines", "--fields", "state", "--no-legend")) == "drained\nschedulable\n"
    # plan: the idle drained machine is out, so the unit would go beside hello.
    (unit_dir / "other.service").write_text("[Service]\nExecStart=/bin/sleep 1\n")
    out = _ok(fleet.run("plan", "other.service"))
    assert out.splitlines()[:2] == [
        "other.service -> 2c9a1b3e... : only machine that fits",
        "  excluded 113f16a7... (machine is drained)",
    ]
    assert "other.service" not in _ok(fleet.run("list-unit-files"))
    assert _ok(fleet.run("uncordon", M1[:6])) == "Machine 113f16a7.../10.0.0.1 takes units again\n"
    assert "(drained)" not in _ok(fleet.run("list-machines"))
    assert _ok(fleet.run("plan", "other.service")).startswith("other.service -> 113f16a7... : least loaded")
    result = fleet.run("drain", "ffff")
    assert result.exit_code == 1 and "0 machines match 'ffff'" in result.output


def test_scale_up_and_down_reports_where_instances_went(fleet, unit_dir):  # noqa: F811
    out = _ok(fleet.run("scale", "web@.service=3"))
    assert sorted(out.splitlines()) == [
        "Unit web@1.service launched on 113f16a7.../10.0.0.1",
        "Unit web@2.service launched on 2c9a1b3e.../10.0.0.2",
        "Unit web@3.service launched on 113f16a7.../10.0.0.1",
    ]
    out = _ok(fleet.run("scale", "web@.service=1"))
    assert out.splitlines() == [
        "Destroyed web@3.service",
        "Destroyed web@2.service",
        "Unit web@1.service launched on 113f16a7.../10.0.0.1",
    ]
    assert sorted(j.name for j in fleet.call(fleet.registry.jobs())) == ["web@.service", "web@1.service"]
    result = fleet.run("scale", "hello.service=2")
    assert result.exit_code == 1 and "hello.service is not a template" in result.output
    result = fleet.run("scale", "web@.service")
    assert result.exit_code == 1 and "give TEMPLATE=COUNT" in result.output
