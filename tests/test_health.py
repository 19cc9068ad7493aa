"""Health checks, fast parts: [X-Fleet] parsing at the door, the pure verdict, the probes against
in-process loopback servers, and the agent over the memory registry, FakeSystemd and a scripted
probe on a manual clock (a failing check restarts the unit, a passing one never does). The real
systemd and etcd versions are in tests/test_health_nodes.py."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from fleetpy.agent.agent import Agent
from fleetpy.agent.health import STARTING, ExecContext, HealthMonitor, judge, probe
from fleetpy.events import AgentEvents
from fleetpy.events.recorder import Recorder
from fleetpy.registry import Assignment, Health, Machine, ManualClock, memory_registry
from fleetpy.systemd import FakeSystemd
from fleetpy.unit import InvalidFleetOptions, UnitFile, parse_fleet_options
from fleetpy.unit.fleet import HealthCheck


def health(body: str, name: str = "web.service") -> HealthCheck | None:
    text = "[Service]\nExecStart=/bin/true\n[X-Fleet]\n" + body
    return parse_fleet_options(name, UnitFile.parse(text)).health


# The door: [X-Fleet] health options.
def test_http_check_with_its_tuning_is_read() -> None:
    check = health(
        "HealthCheckHTTP=http://localhost:8080/health?deep=1\nHealthCheckInterval=5s\n"
        "HealthCheckTimeout=500ms\nHealthCheckThreshold=2\nHealthCheckStartPeriod=1m\n"
    )
    assert check == HealthCheck(
        "http", "127.0.0.1", 8080, "/health?deep=1", interval=5, timeout=0.5, threshold=2, start_period=60
    )
    assert check.target() == "GET http://127.0.0.1:8080/health?deep=1"


def test_defaults_follow_docker_and_kubernetes() -> None:
    check = health("HealthCheckTCP=5432\n")
    assert (check.kind, check.host, check.port) == ("tcp", "127.0.0.1", 5432)
    assert (check.interval, check.timeout, check.threshold, check.start_period, check.restart) == (
        10,
        2,
        3,
        0,
        True,
    )
    assert health("HealthCheckTCP=80\nHealthCheckInterval=1s\n").timeout == 1  # never above it
    assert health("HealthCheckTCP=[::1]:80\nHealthCheckAction=none\n") == HealthCheck(
        "tcp", "::1", 80, restart=False
    )


def test_exec_check_is_an_argv_never_a_shell_line() -> None:
    check = health('HealthCheckExec="/usr/bin/test" "-f" "/srv/my data/ok"\n')
    assert check.argv == ("/usr/bin/test", "-f", "/srv/my data/ok")
    assert health("HealthCheckExec=/bin/sh -c true;reboot\n").argv == ("/bin/sh", "-c", "true;reboot")


def test_a_template_check_is_read_for_each_instance() -> None:
    assert health("HealthCheckTCP=127.0.0.1:80%i\n", "web@.service").port == 801
    assert health("HealthCheckTCP=127.0.0.1:80%i\n", "web@7.service").port == 807
    assert health("HealthCheckHTTP=http://127.0.0.1:8080/%n\n", "web@7.service").path == "/web@7.service"


def test_a_unit_without_a_check_has_none() -> None:
    assert health("Conflicts=a*\n") is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("HealthCheckTCP=10.0.0.1:80\n", "reaches only its own machine; use a loopback address"),
        ("HealthCheckHTTP=http://example.com/\n", "reaches only its own machine"),
        ("HealthCheckHTTP=https://127.0.0.1/\n", "give an http:// URL on this machine"),
        ("HealthCheckHTTP=http://u:p@127.0.0.1/\n", "no user or password"),
        ("HealthCheckTCP=127.0.0.1:0\n", "a port from 1 to 65535"),
        ("HealthCheckTCP=127.0.0.1:\n", "give a port"),
        ("HealthCheckExec=pg_isready -q\n", "must start with an absolute path"),
        ("HealthCheckTCP=80\nHealthCheckExec=/bin/true\n", "a unit has one health check"),
        ("HealthCheckInterval=5s\n", "without a check; add HealthCheckHTTP="),
        ("HealthCheckTCP=80\nHealthCheckInterval=100ms\n", "at least 1s"),
        ("HealthCheckTCP=80\nHealthCheckTimeout=20s\n", "at most HealthCheckInterval"),
        ("HealthCheckTCP=80\nHealthCheckTimeout=0\n", "more than 0"),
        ("HealthCheckTCP=80\nHealthCheckInterval=soon\n", "bad duration 'soon'"),
        ("HealthCheckTCP=80\nHealthCheckThreshold=0\n", "1 to 100"),
        ("HealthCheckTCP=80\nHealthCheckThreshold=three\n", "1 to 100"),
        ("HealthCheckTCP=80\nHealthCheckAction=kill\n", "use restart (the default) or none"),
        ("HealthCheckTCP=80x\n", "HealthCheckTCP=80x"),
    ],
)
def test_bad_checks_are_refused_with_what_to_write(body: str, message: str) -> None:
    with pytest.raises(InvalidFleetOptions, match=message.replace("(", r"\(").replace(")", r"\)")):
        health(body)


def test_an_instance_whose_name_makes_a_bad_port_is_refused() -> None:
    with pytest.raises(InvalidFleetOptions, match="web@x.service: HealthCheckTCP"):
        health("HealthCheckTCP=127.0.0.1:80%i\n", "web@x.service")


# The verdict.
CHECK = HealthCheck("tcp", "127.0.0.1", 80, threshold=3)


def run_checks(check: HealthCheck, results: list[bool], start: Health = STARTING):
    health_now, restarts = start, []
    for ok in results:
        health_now, restart = judge(check, health_now, ok, "" if ok else "refused", False)
        restarts.append(restart)
    return health_now, restarts


def test_threshold_failures_in_a_row_make_a_unit_unhealthy_and_restart_it_once() -> None:
    after, restarts = run_checks(CHECK, [True, False, False])
    assert after == Health("healthy", 2, 0, "refused") and restarts == [False, False, False]
    after, restarts = run_checks(CHECK, [True, False, False, False, False])
    # The restart is counted by the agent once it makes it (see the agent tests below).
    assert after == Health("unhealthy", 4, 0, "refused") and restarts == [False, False, False, True, False]


def test_a_success_clears_the_failures() -> None:
    after, restarts = run_checks(CHECK, [False, False, True, False, False])
    assert after.status == "healthy" and after.failures == 2 and not any(restarts)


def test_failures_in_the_start_period_do_not_count_but_a_success_does() -> None:
    before = Health("starting")
    after, restart = judge(CHECK, before, False, "refused", in_start_period=True)
    assert after == Health("starting", 0, 0, "refused") and not restart
    after, _ = judge(CHECK, before, True, "", in_start_period=True)
    assert after.status == "healthy"
    # Once it passed, the start period is over: failures count.
    after, _ = judge(CHECK, after, False, "refused", in_start_period=True)
    assert after.failures == 1


def test_action_none_only_marks_the_unit() -> None:
    after, restarts = run_checks(dataclasses.replace(CHECK, restart=False), [False] * 5)
    assert after == Health("unhealthy", 5, 0, "refused") and not any(restarts)


def test_the_restarts_made_so_far_are_carried_across_starts() -> None:
    after, restarts = run_checks(CHECK, [False] * 3, Health("starting", 0, 2))
    assert after.restarts == 2 and restarts[-1]


def test_exec_context_is_the_units_user_group_and_directory() -> None:
    unit = UnitFile.parse("[Service]\nExecStart=/bin/true\nUser=web\nGroup=www\nWorkingDirectory=-/srv/web\n")
    assert ExecContext.of(unit) == ExecContext("web", "www", "/srv/web")
    assert (
        ExecContext.of(UnitFile.parse("[Service]\nExecStart=/bin/true\nWorkingDirectory=~\n"))
        == ExecContext()
    )


# The probes, against servers in this process on loopback.
async def _server(answer: bytes | None) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        if answer is None:
            await asyncio.sleep(3600)  # never answers
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_http_probe_passes_on_2xx_3xx_and_fails_otherwise() -> None:
    for answer, passed in ((b"HTTP/1.1 200 OK\r\n\r\n", True), (b"HTTP/1.0 302 Found\r\n\r\n", True)):
        server, port = await _server(answer)
        async with server:
            assert await probe(HealthCheck("http", "127.0.0.1", port), ExecContext()) == (passed, "")
    server, port = await _server(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
    async with server:
        ok, message = await probe(HealthCheck("http", "127.0.0.1", port, "/h"), ExecContext())
    assert not ok and message == f"GET http://127.0.0.1:{port}/h: HTTP/1.1 503 Service Unavailable"


async def test_probes_fail_on_refusal_and_time_out() -> None:
    server, port = await _server(None)
    async with server:
        ok, message = await probe(HealthCheck("http", "127.0.0.1", port, timeout=0.01), ExecContext())
        assert not ok and message.endswith("no answer within 0.01s")
        assert await probe(HealthCheck("tcp", "127.0.0.1", port), ExecContext()) == (True, "")
    server.close()
    await server.wait_closed()
    ok, message = await probe(HealthCheck("tcp", "127.0.0.1", port), ExecContext())
    assert not ok and message.startswith(f"TCP 127.0.0.1:{port}: ")


# The monitor and the agent, stepped on a manual clock.
class ScriptedProbe:
    """Answers each unit's checks from a script (True: passes); counts the checks."""

    def __init__(self) -> None:
        self.passing: dict[int, bool] = {}
        self.calls: list[int] = []

    async def __call__(self, check: HealthCheck, context: ExecContext) -> tuple[bool, str]:
        self.calls.append(check.port)
        ok = self.passing.get(check.port, True)
        return ok, "" if ok else f"{check.target()}: Connection refused"


async def step(agent: Agent, clock: ManualClock, seconds: float) -> None:
    clock.advance(seconds)
    agent.health_monitor.start_due()
    await agent.health_monitor.settle()


async def _running_agent(units: dict[str, str]):
    registry = memory_registry()
    systemd, clock, scripted = FakeSystemd(), ManualClock(), ScriptedProbe()
    events = AgentEvents(Recorder())
    agent = Agent(registry, systemd, Machine("m1"), ttl=5, clock=clock, events=events, health_probe=scripted)
    for name, fleet in units.items():
        digest = await registry.put_unit_file(
            UnitFile.parse(f"[Service]\nExecStart=/bin/sleep 1000\n[X-Fleet]\n{fleet}\n")
        )
        await registry.assign(Assignment(name, "m1", digest, "launched"))
    await agent.reconcile(await registry.assignments("m1"))
    return agent, systemd, clock, scripted, events


def published(agent: Agent, name: str):
    return agent._health.get(name)


async def test_a_failing_check_restarts_the_unit_and_a_passing_one_never_does() -> None:
    agent, systemd, clock, scripted, events = await _running_agent(
        {
            "bad.service": "HealthCheckTCP=81\nHealthCheckInterval=2s\nHealthCheckThreshold=2",
            "good.service": "HealthCheckTCP=82\nHealthCheckInterval=2s\nHealthCheckThreshold=2",
        }
    )
    assert published(agent, "bad.service") == Health("starting")
    scripted.passing[81] = False
    await step(agent, clock, 1)  # the first checks run a second after the start
    assert published(agent, "good.service") == Health("healthy")
    assert published(agent, "bad.service") == Health("starting", 1, 0, "TCP 127.0.0.1:81: Connection refused")
    jobs = list(systemd.jobs)
    await step(agent, clock, 2)
    # Restarted: stopped and started again, so it starts over as "starting", one restart counted.
    assert systemd.jobs[len(jobs) :] == [("stop", "bad.service"), ("start", "bad.service")]
    assert published(agent, "bad.service") == Health("starting", 0, 1, "TCP 127.0.0.1:81: Connection refused")
    kinds = [(e.kind, e.unit) for e in events.recorder.queued]
    assert ("UnitUnhealthy", "bad.service") in kinds and ("UnitHealthy", "good.service") in kinds
    unhealthy = next(e for e in events.recorder.queued if e.kind == "UnitUnhealthy")
    assert unhealthy.message == (
        "bad.service unhealthy after 2 failed health checks in a row: "
        "TCP 127.0.0.1:81: Connection refused; restarting it (restart 1)"
    )
    for _ in range(10):
        await step(agent, clock, 2)
    assert published(agent, "bad.service").restarts == 6
    assert ("start", "good.service") not in systemd.jobs[len(jobs) :]
    assert published(agent, "good.service") == Health("healthy")
    # Checks never overlap and follow the interval: 1 + 11 rounds for the good unit.
    assert scripted.calls.count(82) == 12


async def test_the_health_is_published_with_the_state() -> None:
    agent, systemd, clock, scripted, _ = await _running_agent({"web.service": "HealthCheckTCP=83"})
    await step(agent, clock, 1)
    (state,) = await agent._records({"web.service": await systemd.unit_state("web.service")})
    assert state.health == Health("healthy") and state.to_json()["health"] == {
        "status": "healthy",
        "failures": 0,
        "restarts": 0,
        "message": "",
    }
    await systemd.stop("web.service")
    (state,) = await agent._records({"web.service": await systemd.unit_state("web.service")})
    assert state.health is None and "health" not in state.to_json()
    assert not agent.health_monitor.watching("web.service")


async def test_action_none_marks_the_unit_unhealthy_and_leaves_it_running() -> None:
    agent, systemd, clock, scripted, events = await _running_agent(
        {"web.service": "HealthCheckTCP=84\nHealthCheckThreshold=1\nHealthCheckAction=none"}
    )
    scripted.passing[84] = False
    jobs = len(systemd.jobs)
    for _ in range(4):
        await step(agent, clock, 10)
    assert published(agent, "web.service").status == "unhealthy" and len(systemd.jobs) == jobs
    scripted.passing[84] = True
    await step(agent, clock, 10)
    assert published(agent, "web.service") == Health("healthy")
    messages = [
        e.message for e in events.recorder.queued if e.unit == "web.service" and "health" in e.message
    ]
    assert messages[-1] == "web.service healthy again (TCP 127.0.0.1:84)"


async def test_a_unit_unassigned_or_given_new_content_is_no_longer_checked() -> None:
    agent, systemd, clock, scripted, _ = await _running_agent({"web.service": "HealthCheckTCP=85"})
    assert agent.health_monitor.watching("web.service")
    await agent.reconcile([])
    assert not agent.health_monitor.watching("web.service") and published(agent, "web.service") is None


async def test_a_crashing_probe_is_a_failed_check_not_a_dead_monitor() -> None:
    seen = []

    async def crashes(check: HealthCheck, context: ExecContext) -> tuple[bool, str]:
        raise RuntimeError("boom")

    async def record(name, check, ok, message, in_start_period) -> None:
        seen.append((name, ok, message))

    clock = ManualClock()
    monitor = HealthMonitor(record, crashes, clock)
    monitor.watch("a.service", CHECK, ExecContext())
    clock.advance(1)
    monitor.start_due()
    await monitor.settle()
    assert seen == [("a.service", False, "the check itself failed: boom")]


def test_list_units_and_the_dashboard_show_the_checks_verdict() -> None:
    from fleetpy.api.dashboard import _health
    from fleetpy.cli.fleetctl import health_text
    from fleetpy.registry import UnitState

    assert health_text({"health": {"status": "unhealthy", "restarts": 2}}) == "unhealthy (restarts 2)"
    assert health_text({"health": {"status": "healthy", "restarts": 0}}) == "healthy"
    assert health_text({}) == "-"
    state = UnitState("a.service", "m1", "h", "loaded", "active", "running", health=Health("unhealthy", 3))
    assert _health("launched", "active", False, state) == "unhealthy"
    assert _health("launched", "active", False, dataclasses.replace(state, health=None)) == "healthy"
    assert _health("launched", "failed", False, state) == "failed"
