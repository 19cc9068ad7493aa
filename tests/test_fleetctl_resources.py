"""Capacity, requests and constraints through fleetctl, the real API and two real fleetds (agent
and engine) over FakeSystemd, as tests/test_fleetctl.py runs them; the lab versions are in
tests/test_resources_lab.py."""

from __future__ import annotations

import json

import pytest
import test_fleetctl
from test_fleetctl import HELLO, M1, M2, fleet  # noqa: F401 - fixture

from fleetpy.fleetd.config import Config

GIB = 1024**3


@pytest.fixture
def sized(request, monkeypatch, tmp_path):
    machines = (
        Config(
            machine_id=M1, public_ip="10.0.0.1", capacity={"cpus": 2.0, "memory": 4.0 * GIB}, agent_ttl=600
        ),
        Config(
            machine_id=M2, public_ip="10.0.0.2", capacity={"cpus": 1.0, "memory": 2.0 * GIB}, agent_ttl=600
        ),
    )
    monkeypatch.setattr(test_fleetctl, "MACHINES", machines)
    monkeypatch.chdir(tmp_path)
    return request.getfixturevalue("fleet")


def _ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def test_list_machines_shows_capacity_and_live_facts(sized):
    lines = _ok(sized.run("list-machines", "-o", "wide")).splitlines()
    assert lines[0].split() == ["MACHINE", "IP", "METADATA", "STATE", "CPUS", "MEMORY", "FREE", "LOAD"]
    assert lines[1].split()[:6] == [M1, "10.0.0.1", "-", "schedulable", "2", "4"]
    machines = json.loads(_ok(sized.run("list-machines", "-o", "json")))
    assert machines[0]["capacity"].items() >= {"cpus": 2.0, "memory": 4.0 * GIB}.items()  # disk: the host's
    assert machines[1]["facts"]["os"] == "linux" and "load1" in machines[1]["facts"]
    facts = _ok(sized.run("list-machines", "--fields", "facts", "--no-legend")).splitlines()
    assert all("os=linux" in line.split(",") and "load1=" in line for line in facts), facts


def test_a_unit_too_large_for_every_machine_is_pending_with_what_is_short(sized, tmp_path):
    (tmp_path / "big.service").write_text(HELLO + "[X-Fleet]\nMemoryRequest=8G\n")
    assert _ok(sized.run("start", "--no-block", "big.service")) == ""
    want = "no machine fits: not enough memory (needs 8 GiB, the best has 4 GiB free) on all 2 machines"
    out = _ok(sized.run("list-units", "--fields", "unit,reason", "--no-legend"))
    assert out == f"big.service\t{want}\n"


def test_plan_explains_a_constraint_and_binpack(sized, tmp_path):
    (tmp_path / "wide.service").write_text(HELLO + '[X-Fleet]\nMachineConstraint="memory>3G" "os==linux"\n')
    assert _ok(sized.run("plan", "wide.service")).splitlines()[:2] == [
        "wide.service -> 113f16a7... : only machine that fits",
        f"  excluded {M2[:8]}... (memory>3G does not hold (memory is {2 * GIB}))",
    ]
    (tmp_path / "packed.service").write_text(HELLO + "[X-Fleet]\nStrategy=binpack\nMemoryRequest=1G\n")
    (tmp_path / "first.service").write_text(HELLO + "[X-Fleet]\nMemoryRequest=1G\nMachineID=" + M2 + "\n")
    _ok(sized.run("start", "first.service"))
    # binpack: the machine that is fullest already, though it is the smaller one.
    assert _ok(sized.run("plan", "packed.service")).splitlines()[:3] == [
        f"packed.service -> {M2[:8]}... : fullest that fits (50% used)",
        f"  candidate {M2[:8]}... score 0.50",
        f"  candidate {M1[:8]}... score 0.00",
    ]
