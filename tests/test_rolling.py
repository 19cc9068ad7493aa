"""`fleetctl rolling-replace`: the pure readiness verdict and batching, then end to end against a
real API and two real fleetds (agent with its real health probes, engine) over FakeSystemd, as
tests/test_fleetctl.py runs them; the lab version, with real systemd and a count of healthy
instances throughout, is tests/test_rolling_lab.py."""

from __future__ import annotations

import socket

import pytest
from test_fleetctl import fleet, unit_dir  # noqa: F401 - fixtures

from fleetpy.cli.rolling import batches, instance_order, readiness

NEW = "abc"


def state(active: str = "active", digest: str = NEW, health: dict | None = None, reason: str = "") -> dict:
    record = {"name": "web@1.service", "hash": digest, "systemdActiveState": active, "machineID": "m1"}
    if health is not None:
        record["health"] = health
    if reason:
        record["reason"] = reason
    return record


def test_an_instance_still_on_the_old_content_is_waited_for() -> None:
    assert readiness([state(digest="old")], NEW, False, 0).verdict == "waiting"
    assert readiness([], NEW, False, 0).verdict == "waiting"


def test_with_a_check_only_healthy_is_ready() -> None:
    assert readiness([state(health={"status": "starting"})], NEW, True, 5).verdict == "waiting"
    assert readiness([state(health={"status": "healthy"})], NEW, True, 0).verdict == "ready"


def test_unhealthy_restarted_or_failed_is_a_failure_with_the_reason() -> None:
    found = readiness([state(health={"status": "unhealthy", "message": "GET x: 500"})], NEW, True, 0)
    assert found.verdict == "failed" and found.why == "unhealthy: GET x: 500"
    restarted = {"status": "starting", "restarts": 1, "message": ""}
    assert readiness([state(health=restarted)], NEW, True, 0).verdict == "failed"
    found = readiness([state("failed", reason="exit-code: status 1")], NEW, False, 0)
    assert found == type(found)("failed", "exit-code: status 1")


def test_without_a_check_active_for_a_moment_is_ready() -> None:
    assert readiness([state()], NEW, False, 0.2).verdict == "waiting"
    assert readiness([state()], NEW, False, 1.0).verdict == "ready"
    assert readiness([state("activating")], NEW, False, 0).verdict == "waiting"


def test_batches_and_instance_order() -> None:
    assert batches(["a", "b", "c"], 2) == [["a", "b"], ["c"]]
    names = ["web@10.service", "web@2.service", "web@blue.service", "web@1.service"]
    assert sorted(names, key=instance_order) == [
        "web@1.service",
        "web@2.service",
        "web@10.service",
        "web@blue.service",
    ]


# End to end: real API and fleetds, FakeSystemd, the agent's real probes on loopback.
def _ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def _hashes(fleet) -> dict[str, str]:  # noqa: F811
    return {j.name: j.hash for j in fleet.call(fleet.registry.jobs())}


@pytest.mark.integration
def test_rolling_replace_goes_one_by_one_and_a_bad_version_rolls_back(fleet, unit_dir):  # noqa: F811
    _ok(fleet.run("scale", "web@.service=3"))
    old = _hashes(fleet)
    with socket.socket() as listening, socket.socket() as closed:
        listening.bind(("127.0.0.1", 0))
        listening.listen(64)
        closed.bind(("127.0.0.1", 0))  # bound, never listening: a connect is refused
        _rolling_replace_checks(fleet, unit_dir, old, listening.getsockname()[1], closed.getsockname()[1])


def _rolling_replace_checks(fleet, unit_dir, old, port: int, closed_port: int) -> None:  # noqa: F811
    check = f"[X-Fleet]\nHealthCheckTCP=127.0.0.1:{port}\nHealthCheckInterval=1s\n"
    (unit_dir / "web@.service").write_text("[Service]\nExecStart=/bin/web %i v2\n" + check)
    out = _ok(fleet.run("rolling-replace", "web@.service"))
    lines = out.splitlines()
    assert (
        lines[0].startswith("Replacing 3 of 3 instances of web@.service with ") and "1 at a time" in lines[0]
    )
    # One at a time: each is healthy before the next is touched.
    steps = [line.split()[:2] for line in lines[1:-1]]
    assert [s for s in steps if s[0] in ("Replacing", "Unit")] == [
        ["Replacing", "web@1.service"],
        ["Unit", "web@1.service"],
        ["Replacing", "web@2.service"],
        ["Unit", "web@2.service"],
        ["Replacing", "web@3.service"],
        ["Unit", "web@3.service"],
    ]
    assert all(" healthy on " in line for line in lines if line.startswith("Unit "))
    assert lines[-1].startswith("Replaced 3 instances of web@.service with ")
    v2 = _hashes(fleet)
    assert len({v2[f"web@{i}.service"] for i in (1, 2, 3)} | {v2["web@.service"]}) == 1
    assert v2["web@1.service"] != old["web@1.service"]

    # v3's check finds nothing listening: web@1 turns unhealthy, the run stops and rolls it back.
    bad = (
        f"[X-Fleet]\nHealthCheckTCP=127.0.0.1:{closed_port}\nHealthCheckInterval=1s\nHealthCheckThreshold=1\n"
    )
    (unit_dir / "web@.service").write_text("[Service]\nExecStart=/bin/web %i v3\n" + bad)
    result = fleet.run("rolling-replace", "web@.service", "--timeout", "60")
    assert result.exit_code == 1, result.output
    assert "Error: rolling replace of web@.service stopped at web@1.service: unhealthy: " in result.output
    assert "rolled back 1 instances to their old content" in result.output
    assert "Replacing web@2.service" not in result.output
    assert "Rolled back web@1.service to " + v2["web@1.service"][:7] in result.output
    assert _hashes(fleet) == v2  # every instance and the template back on v2

    # --no-rollback leaves the failed instance on the new content and says so.
    result = fleet.run("rolling-replace", "web@.service", "--no-rollback")
    assert (
        result.exit_code == 1 and "1 instances run" in result.output and "2 were not touched" in result.output
    )
    after = _hashes(fleet)
    assert after["web@1.service"] != v2["web@1.service"] and after["web@2.service"] == v2["web@2.service"]


@pytest.mark.integration
def test_rolling_replace_refuses_what_it_cannot_do(fleet, unit_dir):  # noqa: F811
    result = fleet.run("rolling-replace", "hello.service")
    assert result.exit_code == 1 and "hello.service is not a template" in result.output
    result = fleet.run("rolling-replace", "web@.service")
    assert result.exit_code == 1 and "has no instances; start some first" in result.output
    _ok(fleet.run("scale", "web@.service=1"))
    (unit_dir / "web@.service").write_text(
        "[Service]\nExecStart=/bin/web\n[X-Fleet]\nHealthCheckTCP=10.0.0.1:80\n"
    )
    result = fleet.run("rolling-replace", "web@.service")
    assert result.exit_code == 1 and "reaches only its own machine" in result.output
    assert "Replacing" not in result.output
    result = fleet.run("rolling-replace", "web@.service", "--max-unavailable", "0")
    assert result.exit_code == 2
