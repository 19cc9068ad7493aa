"""`fleetpy registry migrate`: a live registry copied from etcd's v2 store to its v3 store."""

from __future__ import annotations

import asyncio

import pytest
from click.testing import CliRunner

from fleetpy.cli.fleetpy import main
from fleetpy.registry import Assignment, Job, Machine, Registry, UnitState
from fleetpy.registry.etcd2 import EtcdV2Store
from fleetpy.registry.etcd3 import EtcdV3Store
from fleetpy.unit import UnitFile

pytestmark = pytest.mark.integration

HELLO = UnitFile.parse("[Service]\nExecStart=/bin/sleep 1000\n")


def on(url: str, prefix: str, api: str, call):
    async def run():
        registry = Registry((EtcdV2Store if api == "v2" else EtcdV3Store)([url]), prefix)
        try:
            return await call(registry)
        finally:
            await registry.close()

    return asyncio.run(run())


async def a_live_cluster(registry: Registry) -> None:
    await registry.ensure_schema()
    await registry.submit(HELLO, Job("hello.service", HELLO.hash, "launched"))
    await registry.register_machine(Machine("m1", "10.0.0.1"), ttl=60)
    await registry.assign(Assignment("hello.service", "m1", HELLO.hash, "launched"))
    await registry.publish_state(UnitState("hello.service", "m1", HELLO.hash, "loaded", "active", "running"))
    await registry.set_pending("db.service", "no machine has role=db")


async def everything(registry: Registry) -> tuple:
    return (
        await registry.jobs(),
        await registry.unit_file(HELLO.hash),
        await registry.assignments(),
        await registry.states(),
        await registry.pending(),
        await registry.machines(),
    )


def migrate(url: str, prefix: str):
    args = [
        "registry",
        "migrate",
        "--from",
        "v2",
        "--to",
        "v3",
        "--etcd-servers",
        url,
        "--etcd-key-prefix",
        prefix,
    ]
    return CliRunner().invoke(main, args)


def test_migrate_copies_the_durable_records_and_is_safe_to_run_twice(etcd_url, etcd_prefix):
    on(etcd_url, etcd_prefix, "v2", a_live_cluster)
    first = migrate(etcd_url, etcd_prefix)
    assert first.exit_code == 0, first.output
    assert first.output.startswith("copied 6 record(s)")  # version, unit, job, schedule, state, pending
    jobs, unit_file, assignments, states, pending, machines = on(etcd_url, etcd_prefix, "v3", everything)
    assert jobs == [Job("hello.service", HELLO.hash, "launched")]
    assert unit_file == HELLO
    assert [(a.unit, a.machine_id) for a in assignments] == [("hello.service", "m1")]
    assert [(s.unit, s.sub_state) for s in states] == [("hello.service", "running")]
    assert pending == {"db.service": "no machine has role=db"}
    assert machines == []  # each fleetd registers itself on v3
    again = migrate(etcd_url, etcd_prefix)
    assert again.exit_code == 0 and again.output.startswith("copied 0 record(s)"), again.output
    # A change on v2 after the first run is carried over by the next one.
    on(etcd_url, etcd_prefix, "v2", lambda r: r.set_desired_state("hello.service", "loaded"))
    assert migrate(etcd_url, etcd_prefix).output.startswith("copied 1 record(s)")
    jobs = on(etcd_url, etcd_prefix, "v3", lambda r: r.jobs())
    assert jobs == [Job("hello.service", HELLO.hash, "loaded")]


def test_migrate_to_the_same_api_is_refused():
    result = CliRunner().invoke(main, ["registry", "migrate", "--from", "v3", "--to", "v3"])
    assert result.exit_code == 2 and "same API" in result.output
