"""The registry behaves the same over real etcd and over the in-memory store."""

from __future__ import annotations

import threading
import time

import pytest

from fleetpy.registry import (
    Assignment,
    Conflict,
    EtcdStore,
    HistoryLost,
    Job,
    Machine,
    NotFound,
    Registry,
    Unavailable,
    UnitState,
    memory_registry,
)
from fleetpy.unit import UnitFile


@pytest.fixture(params=["etcd", "memory"])
def registry(request):
    if request.param == "memory":
        return memory_registry()
    return request.getfixturevalue("etcd_registry")


HELLO = UnitFile.parse("[Service]\nExecStart=/bin/sleep 1000\n")


def test_unit_files_are_stored_by_content_hash(registry):
    digest = registry.put_unit_file(HELLO)
    assert digest == HELLO.hash
    assert registry.put_unit_file(HELLO) == digest
    assert registry.unit_file(digest) == HELLO
    assert registry.unit_file("0" * 40) is None


def test_job_lifecycle(registry):
    registry.create_job(Job("hello.service", HELLO.hash, "inactive"))
    with pytest.raises(Conflict):
        registry.create_job(Job("hello.service", HELLO.hash, "inactive"))
    registry.set_desired_state("hello.service", "launched")
    assert registry.job("hello.service") == Job("hello.service", HELLO.hash, "launched")
    assert [j.name for j in registry.jobs()] == ["hello.service"]
    registry.delete_job("hello.service")
    assert registry.job("hello.service") is None
    with pytest.raises(NotFound):
        registry.delete_job("hello.service")
    with pytest.raises(NotFound):
        registry.set_desired_state("hello.service", "loaded")


def test_machines_expire_without_heartbeat(registry):
    registry.register_machine(Machine("m1", "10.0.0.1", {"role": "web"}), ttl=1)
    assert registry.machines() == [Machine("m1", "10.0.0.1", {"role": "web"})]
    assert registry.refresh_machine("m1", ttl=1)
    deadline = time.monotonic() + 5
    while registry.machines() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert registry.machines() == []
    assert not registry.refresh_machine("m1", ttl=1)


def test_metadata_edits_lie_over_the_agents_record_and_survive_its_re_registering(registry):
    registry.register_machine(Machine("m1", "10.0.0.1", {"role": "web", "zone": "a"}), ttl=30)
    registry.edit_machine_metadata("m1", {"role": "db", "disk": "ssd"})
    registry.edit_machine_metadata("m1", {"zone": None})
    assert registry.machines() == [Machine("m1", "10.0.0.1", {"role": "db", "disk": "ssd"})]
    registry.register_machine(Machine("m1", "10.0.0.1", {"role": "web", "zone": "a"}), ttl=30)
    assert registry.machines()[0].metadata == {"role": "db", "disk": "ssd"}


def test_editing_a_dead_machines_metadata_does_not_keep_it_alive(registry):
    # B7: an edit rewrote machines/<id> with a fresh TTL, so a dead machine stayed "alive".
    registry.register_machine(Machine("m1", "10.0.0.1", {"role": "web"}), ttl=1)
    registry.edit_machine_metadata("m1", {"role": "db"})
    deadline = time.monotonic() + 5
    while registry.machines() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert registry.machines() == []


def test_schedule_is_kept_per_machine(registry):
    registry.assign(Assignment("a.service", "m1", "h", "launched"))
    registry.assign(Assignment("b.service", "m2", "h", "loaded"))
    assert [a.unit for a in registry.assignments("m1")] == ["a.service"]
    assert {a.unit for a in registry.assignments()} == {"a.service", "b.service"}
    registry.unassign("a.service", "m1")
    assert registry.assignments("m1") == []


def test_pending_reasons_and_states(registry):
    registry.set_pending("web@4.service", "conflicts with web@1.service on all 3 machines")
    assert registry.pending() == {"web@4.service": "conflicts with web@1.service on all 3 machines"}
    registry.set_pending("web@4.service", None)
    assert registry.pending() == {}
    state = UnitState("a.service", "m1", "h", "loaded", "active", "running")
    registry.publish_state(state)
    assert registry.states() == [state]
    registry.remove_state("a.service", "m1")
    assert registry.states() == []


def test_only_one_leader_until_it_stops_renewing(registry):
    assert registry.acquire_leadership("m1", ttl=1)
    assert not registry.acquire_leadership("m2", ttl=1)
    assert registry.renew_leadership("m1", ttl=1)
    assert not registry.renew_leadership("m2", ttl=1)
    assert registry.leader() == "m1"
    registry.resign("m2")
    assert registry.leader() == "m1"
    registry.resign("m1")
    assert registry.acquire_leadership("m2", ttl=1)


def test_wait_wakes_on_change_under_directory_only(registry):
    start = registry.index()
    woke: list[int | None] = []
    watcher = threading.Thread(target=lambda: woke.append(registry.wait(start, "schedule", "m1", timeout=5)))
    watcher.start()
    time.sleep(0.2)
    registry.assign(Assignment("x.service", "m2", "h", "launched"))  # another machine: no wake
    time.sleep(0.2)
    assert woke == []
    registry.assign(Assignment("x.service", "m1", "h", "launched"))
    watcher.join(5)
    assert woke and woke[0] > start


def test_wait_times_out_quietly(registry):
    assert registry.wait(registry.index(), "job", timeout=0.3) is None


def test_heartbeat_refresh_does_not_wake_watchers(etcd_registry):
    etcd_registry.register_machine(Machine("m1"), ttl=10)
    start = etcd_registry.index()
    etcd_registry.refresh_machine("m1", ttl=10)
    assert etcd_registry.wait(start, "machines", timeout=0.5) is None


def test_old_watch_index_reports_history_lost(etcd_registry):
    start = etcd_registry.index()
    for i in range(1010):
        etcd_registry.store.put(etcd_registry.key("noise"), str(i))
    with pytest.raises(HistoryLost):
        etcd_registry.wait(start, "job", timeout=1)


def test_unreachable_etcd_is_a_clear_error():
    registry = Registry(EtcdStore(["http://127.0.0.1:9"], retry_for=0.5, request_timeout=0.2))
    with pytest.raises(Unavailable, match="etcd is unreachable at http://127.0.0.1:9"):
        registry.jobs()
