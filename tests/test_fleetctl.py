"""fleetctl end to end: click's CliRunner against a real API server on a unix socket.

The server runs on its own event loop thread over the in-memory registry, beside two real
fleetds (agent and engine, built as `fleetd` builds them) whose systemd is FakeSystemd, so
blocking commands complete exactly as on a cluster.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from click.testing import CliRunner

from fleetpy.api import create_app, serve
from fleetpy.cli import fleetctl
from fleetpy.cli.fleetctl import cli, tabulate
from fleetpy.client import APIError, Client
from fleetpy.fleetd.config import Config
from fleetpy.fleetd.daemon import build_fleetd
from fleetpy.registry import Registry, memory_registry
from fleetpy.systemd import FakeSystemd
from fleetpy.unit import UnitFile

M1 = "113f16a7" + "a" * 24
M2 = "2c9a1b3e" + "b" * 24
HELLO = "[Unit]\nDescription=Hello\n\n[Service]\nExecStart=/bin/sleep 1000\n"
WEB = "[Service]\nExecStart=/bin/web %i\n"
TOKEN = "s3cret"
MACHINES = (
    Config(machine_id=M1, public_ip="10.0.0.1", metadata={"region": "us", "disk": "ssd"}, agent_ttl=600),
    Config(machine_id=M2, public_ip="10.0.0.2", agent_ttl=600),
)


class FakeLocal:
    async def status(self, name: str) -> str:
        return f"* {name}\n   Active: active (running)\n"

    async def journal(self, name: str, lines: int, follow: bool) -> AsyncIterator[str]:
        for i in range(lines):
            yield f"{name} line {i}\n"


@dataclass
class Fleet:
    registry: Registry
    loop: asyncio.AbstractEventLoop  # the server's, in a thread: the registry is used there only
    endpoint: str
    tcp_endpoint: str

    def call(self, coroutine):
        """A registry call, made on the server's loop."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    def run(self, *args: str, env: dict | None = None):
        return CliRunner().invoke(cli, ["--endpoint", self.endpoint, *args], env=env)


async def _start_cluster(registry: Registry) -> list[asyncio.Task]:
    tasks = [asyncio.create_task(build_fleetd(c, registry, FakeSystemd()).run()) for c in MACHINES]
    while len(await registry.machines()) < len(MACHINES):
        await asyncio.sleep(0.002)
    return tasks


async def _stop_cluster(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
def fleet(tmp_path, monkeypatch):
    # fleetctl's pauses in real time, made short: what it prints and when it returns are tested,
    # not how long it watches a started unit (FakeSystemd's never fail later) or waits per attempt.
    monkeypatch.setattr(fleetctl, "STARTUP_GRACE", 0.01)
    monkeypatch.setattr(fleetctl, "POLL_INTERVAL", 0.02)
    registry = memory_registry()
    loop = asyncio.new_event_loop()
    server = threading.Thread(target=loop.run_forever, daemon=True)
    server.start()
    socket_path = tmp_path / "fleet.sock"
    app = create_app(registry, machine_id=M1, local=FakeLocal())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serving = serve(app, socket_path=str(socket_path), listen=f"127.0.0.1:{port}", token=TOKEN)
    runner = asyncio.run_coroutine_threadsafe(serving, loop).result(10)
    cluster = asyncio.run_coroutine_threadsafe(_start_cluster(registry), loop).result(10)
    try:
        yield Fleet(registry, loop, f"unix://{socket_path}", f"http://127.0.0.1:{port}")
    finally:
        asyncio.run_coroutine_threadsafe(_stop_cluster(cluster), loop).result(10)
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        server.join()
        loop.close()


@pytest.fixture
def unit_dir(tmp_path, monkeypatch):
    directory = tmp_path / "units"
    directory.mkdir()
    (directory / "hello.service").write_text(HELLO)
    (directory / "web@.service").write_text(WEB)
    monkeypatch.chdir(directory)
    return directory


def test_tabulate_pads_with_tabs_like_gos_tabwriter():
    assert tabulate([["MACHINE", "IP", "METADATA"], ["113f16a7...", "10.0.0.1", "-"]]) == (
        "MACHINE\t\tIP\t\tMETADATA\n113f16a7...\t10.0.0.1\t-\n"
    )


def test_list_machines(fleet):
    result = fleet.run("list-machines")
    assert result.exit_code == 0, result.output
    assert result.output == (
        "MACHINE\t\tIP\t\tMETADATA\n113f16a7...\t10.0.0.1\tdisk=ssd,region=us\n2c9a1b3e...\t10.0.0.2\t-\n"
    )


def test_list_machines_full_no_legend_and_fields(fleet):
    result = fleet.run("list-machines", "--full", "--no-legend", "--fields", "machine,ip")
    assert result.output == f"{M1}\t10.0.0.1\n{M2}\t10.0.0.2\n"


def test_bad_fields_are_an_error(fleet):
    result = fleet.run("list-machines", "--fields", "machine,colour")
    assert result.exit_code == 1
    assert 'Error: Invalid key in output format: "colour"' in result.output


def test_submit_then_list_unit_files(fleet, unit_dir):
    result = fleet.run("submit", "hello.service")
    assert result.exit_code == 0, result.output
    digest = UnitFile.parse(HELLO).hash
    result = fleet.run("list-unit-files")
    assert result.output == (
        f"UNIT\t\tHASH\tDSTATE\t\tSTATE\t\tTARGET\nhello.service\t{digest[:7]}\tinactive\tinactive\t-\n"
    )
    assert fleet.call(fleet.registry.job("hello.service")).desired_state == "inactive"


def test_submit_warns_about_deprecated_fleet_options(fleet, unit_dir):
    (unit_dir / "old.service").write_text(
        "[Service]\nExecStart=/bin/true\n[X-Fleet]\nX-ConditionMachineOf=a.service\n"
    )
    result = fleet.run("submit", "old.service")
    assert result.exit_code == 0, result.output
    assert "WARNING: old.service: [X-Fleet] X-ConditionMachineOf is deprecated" in result.output
    assert fleet.call(fleet.registry.job("old.service")) is not None


def test_submit_warns_about_a_line_fleet_read_as_part_of_a_comment(fleet, unit_dir):
    (unit_dir / "trap.service").write_text("[Service]\n# off: \\\nExecStartPre=/bin/x\nExecStart=/bin/true\n")
    result = fleet.run("submit", "trap.service")
    assert result.exit_code == 0, result.output
    assert (
        "WARNING: trap.service:3: 'ExecStartPre=/bin/x' follows a comment ending in a backslash"
        in result.output
    )


def test_start_blocks_until_launched_and_says_where(fleet, unit_dir):
    result = fleet.run("start", "hello.service")
    assert result.exit_code == 0, result.output
    assert result.output == "Unit hello.service launched on 113f16a7.../10.0.0.1\n"
    result = fleet.run("list-units")
    assert result.output == (
        "UNIT\t\tMACHINE\t\t\tACTIVE\tSUB\nhello.service\t113f16a7.../10.0.0.1\tactive\trunning\n"
    )
    result = fleet.run(
        "list-unit-files", "--full", "--no-legend", "--fields", "unit,dstate,state,target,desc"
    )
    assert result.output == f"hello.service\tlaunched\tlaunched\t{M1}/10.0.0.1\tHello\n"


def test_start_creates_new_units_launched_in_one_request_each(fleet, unit_dir, monkeypatch):
    """Go fleetctl creates a unit inactive, then sets it launched; one PUT does both, and a unit
    this command created is not read again."""
    puts, gets = [], []
    pipeline = Client.pipeline

    def recorded(self, requests):
        requests = list(requests)
        puts.extend((path, body["desiredState"]) for method, path, _, body in requests if method == "PUT")
        gets.extend(path for method, path, _, _ in requests if method == "GET" and "/units/" in path)
        return pipeline(self, requests)

    monkeypatch.setattr(Client, "pipeline", recorded)
    fleet.run("submit", "web@.service")
    puts.clear()
    gets.clear()
    result = fleet.run("start", "hello.service", "web@1.service", "web@.service")
    assert "it is a template" in result.output  # checked after the instances were created
    assert puts == [
        ("/fleet/v1/units/hello.service", "launched"),
        ("/fleet/v1/units/web%401.service", "launched"),
    ]
    units = ("hello.service", "web%401.service", "web%40.service")
    assert sorted(gets) == sorted(f"/fleet/v1/units/{name}" for name in units)


def test_load_stop_unload_destroy(fleet, unit_dir):
    assert fleet.run("load", "hello.service").output == "Unit hello.service loaded on 113f16a7.../10.0.0.1\n"
    assert fleet.run("start", "hello").output == "Unit hello.service launched on 113f16a7.../10.0.0.1\n"
    assert fleet.run("stop", "hello.service").output == "Unit hello.service loaded on 113f16a7.../10.0.0.1\n"
    assert fleet.run("unload", "hello.service").output == "Unit hello.service inactive\n"
    result = fleet.run("destroy", "hello.service")
    assert (result.exit_code, result.output) == (0, "Destroyed hello.service\n")
    assert fleet.call(fleet.registry.job("hello.service")) is None


def test_pending_unit_times_out_with_its_reason(fleet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stuck.service").write_text(HELLO + "[X-Fleet]\nMachineMetadata=region=mars\n")
    assert fleet.run("start", "--no-block", "stuck.service").exit_code == 0
    # Once the engine said why it waits, one attempt is enough to time out with the reason.
    for _ in range(500):
        reason = fleet.call(fleet.registry.pending()).get("stuck.service")
        if reason:
            break
        time.sleep(0.002)
    result = fleet.run("start", "--block-attempts", "1", "stuck.service")
    assert result.exit_code == 1
    assert reason == fleet.call(fleet.registry.pending())["stuck.service"]
    assert "region=mars" in reason, reason
    assert (
        f"Error: timed out waiting for unit stuck.service to report state launched (pending: {reason})"
    ) in result.output
    result = fleet.run("list-units", "--fields", "unit,machine,active,reason")
    assert result.output == f"UNIT\t\tMACHINE\tACTIVE\tREASON\nstuck.service\t-\t-\t{reason}\n"


def test_no_block_returns_at_once(fleet, unit_dir):
    result = fleet.run("start", "--no-block", "hello.service")
    assert (result.exit_code, result.output) == (0, "")
    assert fleet.call(fleet.registry.job("hello.service")).desired_state == "launched"


def test_instance_of_submitted_template(fleet, unit_dir):
    assert fleet.run("submit", "web@.service").exit_code == 0
    (unit_dir / "web@.service").unlink()  # the registry's template must be used
    result = fleet.run("start", "web@1.service", "web@2.service")
    assert result.exit_code == 0, result.output
    # Each line comes when its unit gets there, so the two may come in either order.
    assert sorted(result.output.splitlines()) == [
        "Unit web@1.service launched on 113f16a7.../10.0.0.1",
        "Unit web@2.service launched on 2c9a1b3e.../10.0.0.2",
    ]
    assert (
        fleet.call(fleet.registry.job("web@1.service")).hash
        == fleet.call(fleet.registry.job("web@.service")).hash
    )


def test_instance_of_local_template_file(fleet, unit_dir):
    result = fleet.run("start", "web@7.service")
    assert result.exit_code == 0, result.output
    assert fleet.call(fleet.registry.job("web@7.service")).hash == UnitFile.parse(WEB).hash
    assert fleet.call(fleet.registry.job("web@.service")) is None


def test_template_cannot_be_started(fleet, unit_dir):
    result = fleet.run("start", "web@.service")
    assert result.exit_code == 1
    assert "template" in result.output


def test_globs_match_submitted_units(fleet, unit_dir):
    fleet.run("start", "--no-block", "web@1.service", "web@2.service", "hello.service")
    result = fleet.run("stop", "web@*.service")
    assert result.exit_code == 0, result.output
    assert [j.desired_state for j in fleet.call(fleet.registry.jobs())] == ["launched", "loaded", "loaded"]
    result = fleet.run("destroy", "nothing*.service")
    assert result.exit_code == 1 and "no submitted unit matches nothing*.service" in result.output


def test_globs_use_fleets_path_match_grammar(fleet, unit_dir):
    fleet.run("start", "--no-block", "web@1.service", "web@2.service")
    # Go's path.Match: [^1] negates; fnmatch would read [!1] as the negation instead.
    assert fleet.run("stop", "web@[^1].service").exit_code == 0
    assert {j.name: j.desired_state for j in fleet.call(fleet.registry.jobs())} == {
        "web@1.service": "launched",
        "web@2.service": "loaded",
    }
    result = fleet.run("stop", "web@[.service")
    assert result.exit_code == 1 and "has a '[' without its ']'" in result.output


def test_replace_resubmits_a_changed_file(fleet, unit_dir):
    fleet.run("submit", "hello.service")
    (unit_dir / "hello.service").write_text(HELLO.replace("1000", "2000"))
    result = fleet.run("start", "--no-block", "hello.service")
    assert "differs from local unit file" in result.output
    assert fleet.call(fleet.registry.job("hello.service")).hash == UnitFile.parse(HELLO).hash
    result = fleet.run("start", "--replace", "hello.service")
    assert result.exit_code == 0, result.output
    assert (
        fleet.call(fleet.registry.job("hello.service")).hash
        == UnitFile.parse(HELLO.replace("1000", "2000")).hash
    )


def test_cat_prints_the_unit_file(fleet, unit_dir):
    fleet.run("submit", "hello.service")
    result = fleet.run("cat", "hello.service")
    assert result.output == UnitFile.parse(HELLO).to_text()
    result = fleet.run("cat", "nope.service")
    assert (result.exit_code, result.output) == (1, "Error: Unit nope.service not found\n")


def test_status_and_journal(fleet, unit_dir):
    fleet.run("start", "hello.service")
    # Events reach etcd in batches, a moment after the start.
    for _ in range(500):
        result = fleet.run("status", "hello.service")
        if "UnitStarted" in result.output:
            break
        time.sleep(0.01)
    head, events = result.output.split("\nEvents:\n")
    assert head == "* hello.service\n   Active: active (running)\n"
    assert "UnitStarted" in events and "hello.service started" in events
    result = fleet.run("journal", "--lines", "2", "hello.service")
    assert result.output == "hello.service line 0\nhello.service line 1\n"


def test_stop_unknown_unit_fails(fleet):
    result = fleet.run("stop", "ghost.service")
    assert result.exit_code == 1
    assert "unable to find unit ghost.service" in result.output


def test_invalid_local_file_is_reported(fleet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.service").write_text("ExecStart=/bin/true\n")
    result = fleet.run("submit", "bad.service")
    assert result.exit_code == 1
    assert result.output.startswith("Error: bad.service: line 1:")


def test_unreachable_fleetd_is_explained(tmp_path):
    result = CliRunner().invoke(
        cli, ["list-machines"], env={"FLEETCTL_ENDPOINT": f"unix://{tmp_path}/none.sock"}
    )
    assert result.exit_code == 1
    assert f"Error: cannot reach fleetd at unix://{tmp_path}/none.sock" in result.output
    assert "set --endpoint or FLEETCTL_ENDPOINT" in result.output


def test_client_sets_and_removes_machine_metadata(fleet):
    with Client(fleet.endpoint) as client:
        client.set_machine_metadata(M2, "role", "db")
        assert client.machines()[1]["metadata"] == {"role": "db"}
        client.set_machine_metadata(M2, "role", None)
        assert client.machines()[1]["metadata"] == {}
        assert client.unit("nope.service") is None


def test_client_leaves_an_instances_template_to_fleetd(fleet):
    # One home for template resolution: fleetd's API, not a copy in the client.
    with Client(fleet.endpoint) as client:
        client.create_unit("web@.service", "inactive", UnitFile.parse(WEB).to_options())
        client.create_unit("web@7.service", "inactive")
        assert client.unit("web@7.service")["options"] == client.unit("web@.service")["options"]
        with pytest.raises(APIError, match="its template db@.service is not submitted"):
            client.create_unit("db@1.service", "inactive")


def test_tcp_endpoint_needs_the_token(fleet):
    refused = CliRunner().invoke(cli, ["--endpoint", fleet.tcp_endpoint, "list-machines", "--no-legend"])
    assert refused.exit_code == 1
    assert "Error: missing or wrong API token" in refused.output
    allowed = CliRunner().invoke(
        cli, ["--endpoint", fleet.tcp_endpoint, "list-machines", "--no-legend"], env={"FLEETCTL_TOKEN": TOKEN}
    )
    assert allowed.exit_code == 0
    assert allowed.output.startswith("113f16a7...\t10.0.0.1")


def test_request_timeout_bounds_a_silent_fleetd(tmp_path):
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as silent:  # accepts connections, never answers
        silent.bind(str(path))
        silent.listen(8)
        started = time.monotonic()
        result = CliRunner().invoke(
            cli, ["--endpoint", f"unix://{path}", "--request-timeout", "0.05", "list-machines"]
        )
        elapsed = time.monotonic() - started
    # It took the connection, so it runs: the message says it did not answer, not that it is away.
    assert result.exit_code == 1 and "took the request but did not answer within 0.05s" in result.output
    assert elapsed < 3


def test_version_flag():
    assert CliRunner().invoke(cli, ["--version"]).output.startswith("fleetctl, version ")


def test_output_json_and_yaml_print_the_apis_records(fleet, unit_dir):
    import json

    import yaml

    fleet.run("start", "hello.service")
    units = json.loads(fleet.run("list-units", "-o", "json").output)
    assert [(u["name"], u["machineID"] in (M1, M2), u["systemdActiveState"]) for u in units] == [
        ("hello.service", True, "active")
    ]
    machines = yaml.safe_load(fleet.run("list-machines", "-o", "yaml").output)
    assert sorted(m["id"] for m in machines) == sorted([M1, M2])
    assert {"id", "primaryIP", "metadata"} <= set(machines[0])
    files = json.loads(fleet.run("list-unit-files", "--output", "json").output)
    assert [(f["name"], f["desiredState"]) for f in files] == [("hello.service", "launched")]
    (status,) = json.loads(fleet.run("status", "-o", "json", "hello.service").output)
    assert status["name"] == "hello.service" and "active (running)" in status["status"]
    assert status["states"][0]["systemdActiveState"] == "active"
    wide = fleet.run("list-units", "-o", "wide").output.splitlines()
    assert wide[0].split() == ["UNIT", "MACHINE", "LOAD", "ACTIVE", "SUB", "HEALTH", "HASH", "REASON"]
    assert M1 in wide[1] or M2 in wide[1]  # machine ids unabridged
    result = fleet.run("list-units", "-o", "xml")
    assert result.exit_code == 2 and "'xml' is not one of" in result.output


def test_shell_completion_offers_commands_unit_names_and_machine_ids(fleet, unit_dir):
    fleet.run("submit", "hello.service")

    def complete(words: str) -> list[str]:
        env = {
            "_FLEETCTL_COMPLETE": "bash_complete",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split()) - 1),
        }
        result = CliRunner().invoke(cli, [], env=env, prog_name="fleetctl")
        assert result.exit_code == 0, result.output
        return [line.split(",", 1)[1] for line in result.output.splitlines() if line]

    assert "list-units" in complete("fleetctl list-")
    assert complete(f"fleetctl --endpoint {fleet.endpoint} status he") == ["hello.service"]
    assert complete(f"fleetctl --endpoint {fleet.endpoint} drain 113") == [M1]
    assert complete("fleetctl --endpoint unix:///nonexistent.sock status he") == []
