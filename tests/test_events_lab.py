"""Issue 14, events on a real cluster: three fleetd on real nodes, one real etcd. What fleetctl
does and what happens to machines shows up in `fleetctl events`, `events -f` and `status`."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from labtools import wait_for
from prometheus_client.parser import text_string_to_metric_families

from fleetpy.cli.fleetctl import cli
from fleetpy.cli.fleetpy import main as fleetpy_cli
from fleetpy.client import Client
from fleetpy.lab.lab import Lab
from fleetpy.lab.metrics import scrape

pytestmark = pytest.mark.integration

AGENT_TTL = 3.0
SLEEP = "[Unit]\nDescription={name}\n[Service]\nExecStart=/bin/sleep 100000\n"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(Path(tmp_path_factory.mktemp("evlab", numbered=True)))
    lab.up(node_count=3, network="loopback", agent_ttl=f"{AGENT_TTL:.0f}s", containers=False)
    try:
        yield lab
    finally:
        lab.down()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fleetctl(lab: Lab, *args: str, endpoint: str | None = None) -> str:
    result = CliRunner().invoke(cli, ["--endpoint", endpoint or lab.endpoint(), *args])
    assert result.exit_code == 0, result.output
    return result.output


def events_of(client: Client, unit: str | None = None, kind: str | None = None) -> list[dict]:
    return [e for e in client.events(unit=unit, limit=1000) if kind is None or e["kind"] == kind]


def node_of(lab: Lab, machine_id: str) -> str:
    return next(n.name for n in lab.state.nodes if n.machine_id == machine_id)


def test_the_lab_coming_up_is_recorded(lab):
    with Client(lab.endpoint()) as client:
        joined = wait_for("3 joins", lambda: len(e := events_of(client, kind="MachineJoined")) >= 3 and e)
        assert {e["machineID"] for e in joined} >= {n.machine_id for n in lab.state.nodes}
        leaders = events_of(client, kind="LeaderChanged")
        assert leaders and leaders[-1]["machineID"] == lab.leader()


def test_a_started_unit_is_scheduled_with_a_reason_started_and_shown_by_status(lab, workdir):
    (workdir / "hello.service").write_text(SLEEP.format(name="hello"))
    fleetctl(lab, "start", "hello.service")
    with Client(lab.endpoint()) as client:
        wait_for("UnitStarted", lambda: events_of(client, "hello.service", "UnitStarted"))
        scheduled = events_of(client, "hello.service", "UnitScheduled")
        assert len(scheduled) == 1
        message = scheduled[0]["message"]
        assert message.startswith(f"hello.service scheduled to {scheduled[0]['machineID'][:8]}: ")
        assert "least loaded" in message or "only machine" in message
    listing = fleetctl(lab, "events", "--unit", "hello")
    assert listing.splitlines()[0].split() == ["TIME", "TYPE", "KIND", "MACHINE", "MESSAGE"]
    assert "UnitScheduled" in listing and "UnitStarted" in listing
    assert "MachineJoined" not in listing
    status = fleetctl(lab, "status", "hello.service")
    tail = status[status.index("\nEvents:\n") :]
    assert "active (running)" in status[: status.index("\nEvents:\n")]
    assert "UnitScheduled" in tail and "UnitStarted" in tail


def test_the_lab_scrapes_every_nodes_metrics_into_one_text(lab):
    hello_on = wait_for(
        "hello placed",
        lambda: next(
            (s["machineID"] for s in Client(lab.endpoint()).unit_states(unit_name="hello.service")), None
        ),
    )
    names = [n.name for n in lab.state.nodes]

    # etcd's time by fleetd activity: every node's join and heartbeats (a keepalive, or a new
    # record when its facts changed enough), the leader's scheduling writes.
    def beats(found: dict, n: str) -> float:
        refreshes = (("call", "refresh_machine"), ("node", n), ("operation", "refresh"))
        registrations = (("call", "register_machine"), ("node", n), ("operation", "put"))
        count = "fleetpy_etcd_request_seconds_count"
        return found.get((count, refreshes), 0) + found.get((count, registrations), 0)

    def scraped() -> dict:
        result = CliRunner().invoke(fleetpy_cli, ["lab", "metrics", "--dir", str(lab.dir)])
        assert result.exit_code == 0, result.output
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(result.output)
            for s in family.samples
        }

    def scraped_once_every_node_beat() -> dict | None:
        found = scraped()
        return found if all(beats(found, n) >= 2 for n in names) else None

    # A node joined less than a heartbeat (TTL/3) ago has only its join to show: scrape again.
    found = wait_for(
        "a join and a heartbeat from every node",
        scraped_once_every_node_beat,
        timeout=3 * AGENT_TTL,
        interval=0.2,
    )
    assert all(found[("fleetpy_scrape_up", (("node", n),))] == 1 for n in names)
    runs_hello = node_of(lab, hello_on)
    assert found[("fleetpy_dbus_call_seconds_count", (("method", "StartUnit"), ("node", runs_hello)))] >= 1
    assert all(found[("fleetpy_agent_reconcile_seconds_count", (("node", n),))] >= 1 for n in names)
    leader = node_of(lab, lab.leader())
    assert found[("fleetpy_leader_changes_total", (("node", leader),))] >= 1
    assert found[("fleetpy_scheduling_decisions_total", (("node", leader), ("outcome", "scheduled")))] >= 1
    assert found[("fleetpy_unit_states", (("active_state", "active"), ("node", leader)))] >= 1

    assert (
        found[
            (
                "fleetpy_etcd_request_seconds_count",
                (("call", "write_schedule"), ("node", leader), ("operation", "apply")),
            )
        ]
        >= 1
    )


def test_json_yaml_and_wide_output_give_the_documented_fields_on_a_real_cluster(lab):
    """The field names README's "Output for scripts" promises, read from real fleetds."""
    wait_for("hello running", lambda: "active" in fleetctl(lab, "list-units", "--no-legend"))
    units = json.loads(fleetctl(lab, "list-units", "-o", "json"))
    (hello,) = [u for u in units if u["name"] == "hello.service"]
    assert {
        "name",
        "machineID",
        "hash",
        "systemdLoadState",
        "systemdActiveState",
        "systemdSubState",
    } <= hello.keys()
    assert (hello["systemdActiveState"], hello["systemdSubState"]) == ("active", "running")
    machines = yaml.safe_load(fleetctl(lab, "list-machines", "-o", "yaml"))
    assert {m["id"] for m in machines} == {n.machine_id for n in lab.state.nodes}
    assert all({"id", "primaryIP", "metadata"} <= m.keys() for m in machines)
    files = json.loads(fleetctl(lab, "list-unit-files", "-o", "json"))
    (hello_file,) = [f for f in files if f["name"] == "hello.service"]
    assert {"desiredState", "currentState", "machineID", "options", "global"} <= hello_file.keys()
    assert (hello_file["desiredState"], hello_file["machineID"]) == ("launched", hello["machineID"])
    (status,) = json.loads(fleetctl(lab, "status", "-o", "json", "hello.service"))
    assert status["name"] == "hello.service" and status["states"][0]["machineID"] == hello["machineID"]
    assert "active (running)" in status["status"]
    assert {"UnitScheduled", "UnitStarted"} <= {e["kind"] for e in status["events"]}
    events = json.loads(fleetctl(lab, "events", "--unit", "hello.service", "-o", "json"))
    fields = {"time", "reporter", "seq", "kind", "type", "unit", "machineID", "message"}
    assert events and all(fields <= e.keys() for e in events)
    wide = fleetctl(lab, "list-units", "-o", "wide").splitlines()
    assert wide[0].split()[:3] == ["UNIT", "MACHINE", "LOAD"]
    assert any(line.startswith("hello.service") and hello["machineID"] in line for line in wide[1:])


def test_fleetpy_completes_the_labs_nodes_members_and_units(lab):
    def complete(words: str) -> list[str]:
        env = {
            "_FLEETPY_COMPLETE": "bash_complete",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split()) - 1),
        }
        result = CliRunner().invoke(fleetpy_cli, [], env=env, prog_name="fleetpy")
        assert result.exit_code == 0, result.output
        return [line.split(",", 1)[1] for line in result.output.splitlines() if line]

    where = f"--dir {lab.dir}"
    assert complete(f"fleetpy lab kill-node {where} no") == ["node1", "node2", "node3"]
    assert complete(f"fleetpy lab shell {where} hel") == ["hello.service"]
    assert complete(f"fleetpy lab etcd-kill {where} e") == ["etcd0"]
    assert complete("fleetpy lab kill-node --dir /nonexistent no") == []


def test_a_failing_unit_is_recorded_with_systemds_result(lab, workdir):
    (workdir / "crash.service").write_text("[Service]\nExecStart=/bin/sh -c 'exit 3'\n")
    fleetctl(lab, "start", "--no-block", "crash.service")
    with Client(lab.endpoint()) as client:
        failed = wait_for("UnitFailed", lambda: events_of(client, "crash.service", "UnitFailed"))
    assert failed[0]["type"] == "Warning"
    assert failed[0]["message"] == "crash.service failed: exit-code: the main process exited with status 3"


def test_a_unit_nothing_fits_is_recorded_as_pending_with_the_reason(lab, workdir):
    (workdir / "picky.service").write_text(
        SLEEP.format(name="picky") + "[X-Fleet]\nMachineMetadata=role=gpu\n"
    )
    fleetctl(lab, "start", "--no-block", "picky.service")
    with Client(lab.endpoint()) as client:
        pending = wait_for("UnitPending", lambda: events_of(client, "picky.service", "UnitPending"))
    assert pending[0]["message"].startswith("picky.service pending: no machine fits")
    assert "role=gpu" in pending[0]["message"]


def test_a_killed_node_is_lost_and_its_unit_moves_seen_live_by_events_follow(lab, workdir):
    (workdir / "mover.service").write_text(SLEEP.format(name="mover"))
    fleetctl(lab, "start", "mover.service")
    client = Client(lab.endpoint())
    where = wait_for(
        "mover placed",
        lambda: next((s["machineID"] for s in client.unit_states(unit_name="mover.service")), None),
    )
    victim = node_of(lab, where)
    survivor = next(n for n in lab.state.nodes if n.name != victim)
    endpoint = f"unix://{lab.dir / survivor.name / 'fleet.sock'}"
    follower, streamed = Client(endpoint), []

    def follow() -> None:
        for event in follower.follow_events(unit="mover.service", limit=0):
            streamed.append(event)
            if event["kind"] == "UnitMoved":
                return

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    time.sleep(1)  # the stream is open before anything happens
    lab.kill_node(victim)
    try:
        try:
            wait_for(
                "UnitMoved streamed",
                lambda: any(e["kind"] == "UnitMoved" for e in streamed),
                timeout=3 * AGENT_TTL + 15,
            )
        except AssertionError:
            with Client(endpoint) as other:
                raise AssertionError(f"streamed {streamed}; recorded {events_of(other)[-12:]}") from None
        moved = next(e for e in streamed if e["kind"] == "UnitMoved")
        assert moved["message"].startswith(f"mover.service moved from {where[:8]} (machine gone) to ")
        assert moved["machineID"] != where
        with Client(endpoint) as other:
            lost = events_of(other, kind="MachineLost")
        assert any(e["machineID"] == where and "no heartbeat within its 3s TTL" in e["message"] for e in lost)
        listing = fleetctl(lab, "events", "--machine", where[:8], endpoint=endpoint)
        assert "MachineLost" in listing
    finally:
        reader.join(timeout=5)
        follower.close()
        client.close()
        lab.restart_node(victim)


def test_etcd_going_away_and_coming_back_is_recorded_by_every_fleetd(lab):
    logs = {n.name: lab.dir / n.name / "fleetd.log" for n in lab.state.nodes}
    seen = {name: log.stat().st_size for name, log in logs.items()}
    lab.etcd_kill("0")
    # The store retries for 10 s (a request under way may end later still) before a heartbeat
    # gives up and calls etcd unreachable: etcd stays away until every fleetd has said so.
    wait_for(
        "every fleetd's heartbeat failed",
        lambda: all(b"heartbeat failed" in log.read_bytes()[seen[name] :] for name, log in logs.items()),
        timeout=60,
        interval=0.5,
    )
    lab.etcd_start("0")
    lab.wait_registered()
    with Client(lab.endpoint()) as client:

        def reachable_everywhere() -> list[dict]:
            back = events_of(client, kind="EtcdReachable")
            return back if len({e["reporter"] for e in back}) == 3 else []

        back = wait_for("EtcdReachable from every node", reachable_everywhere, timeout=20)
        away = events_of(client, kind="EtcdUnreachable")
    assert {e["reporter"] for e in away} == {n.machine_id for n in lab.state.nodes}
    assert all(e["message"].startswith("etcd unreachable: etcd is unreachable at ") for e in away)
    assert all(e["message"].startswith("etcd reachable again after ") for e in back)

    # Every fleetd counted the requests etcd failed, by the activity that made them (scraped
    # again until every node answers: a fleetd just back from the outage may answer late).
    def failed_requests() -> dict[str, float]:
        failed: dict[str, float] = {}
        for family in text_string_to_metric_families(scrape(lab.book)):
            for s in family.samples:
                if s.name == "fleetpy_etcd_errors_total":
                    failed[s.labels["node"]] = failed.get(s.labels["node"], 0) + s.value
        return failed

    wait_for(
        "etcd errors counted by every node",
        lambda: all(failed_requests().get(n.name, 0) >= 1 for n in lab.state.nodes),
        timeout=30,
        interval=1,
    )


def test_a_fleetd_stopped_records_that_its_machine_left(lab):
    node = lab.state.nodes[-1]  # not node1, whose API the test reads
    lab.stop_fleetd(node.name)
    try:
        with Client(lab.endpoint()) as client:
            left = wait_for(
                "MachineLeft",
                lambda: [
                    e for e in events_of(client, kind="MachineLeft") if e["reporter"] == node.machine_id
                ],
            )
        assert (
            left[-1]["message"]
            == f"machine {node.machine_id[:8]} left: fleetd stopped; its units keep running"
        )
    finally:
        lab.start_fleetd(node.name)
        lab.wait_registered()
