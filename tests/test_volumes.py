"""Local volumes as pure data and on a temporary disk: the Volume= rule, the scheduler's
stickiness filter, the agent making the directory safely and handing it to the unit, and the
API's list and forget."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from fleetpy.agent.agent import Agent
from fleetpy.agent.volumes import VolumeError, prepare_shared_volume, prepare_volume, with_volumes
from fleetpy.api import create_app
from fleetpy.engine.scheduler import Reason, plan
from fleetpy.registry import Assignment, Machine, memory_registry
from fleetpy.registry.models import Job
from fleetpy.systemd import FakeSystemd
from fleetpy.unit import UnitFile, load_unit
from fleetpy.unit.errors import InvalidFleetOptions
from fleetpy.unit.file import UnitFile as File

A = "1a2b" + "0" * 28
B = "2b3c" + "0" * 28
SLEEP = "[Service]\nExecStart=/bin/sleep infinity\n"


def fleet(name: str, x_fleet: str):
    return load_unit(name, SLEEP + "[X-Fleet]\n" + x_fleet + "\n").fleet


def job(name: str, x_fleet: str = "") -> tuple[Job, object]:
    u = load_unit(name, SLEEP + ("[X-Fleet]\n" + x_fleet + "\n" if x_fleet else ""))
    return Job(name, u.hash, "launched"), u


# --- the Volume= rule --------------------------------------------------------------------------


def test_volume_names_are_read_in_order_once_each() -> None:
    assert fleet("db.service", "Volume=data\nVolume=logs data").volumes == ("data", "logs")
    assert fleet("db.service", "MachineID=x").volumes == ()


@pytest.mark.parametrize("bad", ["../etc", "a/b", "..", ".", "a..b", "a%b", "a$b", "é", "x" * 129])
def test_a_volume_name_that_is_not_one_safe_path_component_is_refused(bad: str) -> None:
    with pytest.raises(InvalidFleetOptions, match="may hold only letters"):
        fleet("db.service", f"Volume={bad}")


def test_a_template_volume_is_checked_per_instance() -> None:
    assert fleet("db@.service", "Volume=data-%i").volumes == ("data-%i",)
    assert fleet("db@1.service", "Volume=data-%i").volumes == ("data-1",)
    with pytest.raises(InvalidFleetOptions, match=r"Volume=data-a\\x2db"):
        fleet("db@a\\x2db.service", "Volume=data-%i")


def test_volumes_that_would_share_a_variable_global_volumes_and_non_services_are_refused() -> None:
    with pytest.raises(InvalidFleetOptions, match=r"both be \$FLEET_VOLUME_a_b"):
        fleet("db.service", "Volume=a-b a.b")
    with pytest.raises(InvalidFleetOptions, match="Global=true cannot be combined with Volume"):
        fleet("db.service", "Global=true\nVolume=data")
    with pytest.raises(InvalidFleetOptions, match="Volume= is for services"):
        fleet("db.socket", "Volume=data")


def test_a_volume_word_is_name_and_driver_local_by_default() -> None:
    options = fleet("db.service", "Volume=data pg:shared logs:local\nVolume=pg:shared")
    assert (options.volumes, options.shared_volumes) == (("data", "logs"), ("pg",))
    assert fleet("db@.service", "Volume=data-%i:shared").shared_volumes == ("data-%i",)
    assert fleet("db@2.service", "Volume=data-%i:shared").shared_volumes == ("data-2",)
    with pytest.raises(InvalidFleetOptions, match="Global=true cannot be combined with Volume"):
        fleet("db.service", "Global=true\nVolume=pg:shared")


@pytest.mark.parametrize("word", ["pg:nfs", "pg:", "pg:shared:x", "pg:Shared"])
def test_an_unknown_volume_driver_is_refused_with_what_to_write(word: str) -> None:
    with pytest.raises(InvalidFleetOptions) as caught:
        fleet("db.service", f"Volume={word}")
    assert f"db.service: Volume={word}: unknown volume driver" in str(caught.value)
    assert "write Volume=pg for a local volume" in str(caught.value)
    assert "or Volume=pg:shared for one on the shared volume directory" in str(caught.value)


def test_one_volume_with_two_drivers_is_refused() -> None:
    with pytest.raises(
        InvalidFleetOptions, match="Volume=pg:local and Volume=pg:shared name one volume with two"
    ):
        fleet("db.service", "Volume=pg\nVolume=pg:shared")
    with pytest.raises(InvalidFleetOptions, match="Volume=pg:shared and Volume=pg:local name one volume"):
        fleet("db.service", "Volume=pg:shared pg:local")
    with pytest.raises(InvalidFleetOptions, match="may hold only letters"):
        fleet("db.service", "Volume=../etc:shared")
    with pytest.raises(InvalidFleetOptions, match=r"both be \$FLEET_VOLUME_a_b"):
        fleet("db.service", "Volume=a-b a.b:shared")


# --- the scheduler -----------------------------------------------------------------------------


def test_a_shared_volume_unit_goes_only_to_machines_with_a_shared_volume_dir() -> None:
    jobs = [job("busy.service", f"MachineID={B}"), job("db.service", "Volume=pg:shared")]
    machines = [Machine(A), Machine(B, shared_volumes=True)]
    for detail in ((), {"db.service"}):
        p = plan(machines, jobs, [], detail=detail)
        assert {a.unit: a.machine_id for a in p.assignments}["db.service"] == B  # the busier one
    p = plan(machines, jobs, [], detail={"db.service"})
    assert p.decisions["db.service"].filtered == {A: Reason("shared-volume", ("pg",))}
    assert str(Reason("shared-volume", ("pg",))) == (
        "volume pg is shared; no shared volume directory here (fleetd --shared-volume-dir)"
    )
    # Nothing recorded pins it: with B gone it goes to any machine with a shared volume dir.
    p = plan([Machine(A, shared_volumes=True)], jobs[1:], [], volumes={"pg": B})
    assert [(a.unit, a.machine_id) for a in p.assignments] == [("db.service", A)]


def test_a_shared_volume_unit_with_no_machine_to_run_it_is_pending_with_the_reason() -> None:
    machines = [Machine(A), Machine(B, shared_volumes=True, cordoned=True)]
    jobs = [job("db.service", "Volume=pg:shared")]
    fast, detailed = plan(machines, jobs, []), plan(machines, jobs, [], detail={"db.service"})
    assert fast.pending == detailed.pending
    assert str(fast.pending["db.service"]) == (
        "0/2 machines fit: 1 machine is drained, 1 volume pg is shared; no shared volume directory "
        "here (fleetd --shared-volume-dir)"
    )
    # A unit running where the directory went away (fleetd restarted without it) moves.
    current = [Assignment("db.service", A, jobs[0][0].hash, "launched")]
    p = plan([Machine(A), Machine(B, shared_volumes=True)], jobs, current)
    assert [(a.unit, a.machine_id) for a in p.assignments] == [("db.service", B)]


def test_a_machine_record_says_whether_it_has_a_shared_volume_dir() -> None:
    record = Machine(A, shared_volumes=True).to_json()
    assert record["sharedVolumes"] is True and Machine.from_json(record).shared_volumes
    assert "sharedVolumes" not in Machine(A).to_json()
    assert not Machine.from_json({"id": A, "sharedVolumes": "yes"}).shared_volumes


def test_a_unit_goes_where_its_volume_lives_even_onto_the_busier_machine() -> None:
    jobs = [job("busy.service", f"MachineID={A}"), job("db.service", "Volume=data")]
    assert {a.unit: a.machine_id for a in plan([Machine(A), Machine(B)], jobs, []).assignments} == {
        "busy.service": A,
        "db.service": B,
    }
    placed = plan([Machine(A), Machine(B)], jobs, [], volumes={"data": A})
    assert {a.unit: a.machine_id for a in placed.assignments}["db.service"] == A


def test_a_unit_whose_volume_machine_is_gone_stays_pending_with_the_reason() -> None:
    p = plan([Machine(A)], [job("db.service", "Volume=data")], [], detail={"db.service"}, volumes={"data": B})
    assert p.assignments == ()
    (reason,) = p.decisions["db.service"].filtered.values()
    assert reason == Reason("volume", ("data", B, False))
    assert str(p.pending["db.service"]) == (
        "no machine fits: volume data lives on 2b3c0000..., a machine that is gone "
        "('fleetctl volume rm data' starts it afresh elsewhere) on the only machine"
    )
    # Without the detail the fast path says the same.
    fast = plan([Machine(A)], [job("db.service", "Volume=data")], [], volumes={"data": B})
    assert fast.pending == p.pending


def test_a_unit_is_not_kept_off_its_volume_and_is_placed_anywhere_once_forgotten() -> None:
    current = [Assignment("db.service", B, job("db.service", "Volume=data")[0].hash, "launched")]
    p = plan([Machine(A), Machine(B)], [job("db.service", "Volume=data")], current, volumes={"data": A})
    assert [(a.unit, a.machine_id) for a in p.assignments] == [("db.service", A)]
    p = plan([Machine(A)], [job("db.service", "Volume=data")], [], volumes={})
    assert [(a.unit, a.machine_id) for a in p.assignments] == [("db.service", A)]


# --- the directory and the unit file -----------------------------------------------------------


def test_a_volume_is_a_private_directory_under_the_volume_dir(tmp_path: Path) -> None:
    path = prepare_volume(tmp_path / "volumes", "data")
    assert path == (tmp_path / "volumes" / "data").resolve()
    assert stat.S_IMODE(os.lstat(path).st_mode) & 0o007 == 0 and path.is_dir()
    (path / "keep").write_text("x")
    assert prepare_volume(tmp_path / "volumes", "data") == path and (path / "keep").read_text() == "x"


def test_a_symlink_or_file_planted_as_a_volume_is_refused_and_not_followed(tmp_path: Path) -> None:
    root, outside = tmp_path / "volumes", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "data").symlink_to(outside)
    with pytest.raises(VolumeError, match="not a plain directory"):
        prepare_volume(root, "data")
    (root / "gone").symlink_to(tmp_path / "nothing")  # dangling: mkdir must not create its target
    with pytest.raises(VolumeError):
        prepare_volume(root, "gone")
    assert not (tmp_path / "nothing").exists()
    (root / "file").write_text("")
    with pytest.raises(VolumeError):
        prepare_volume(root, "file")
    with pytest.raises(InvalidFleetOptions):
        prepare_volume(root, "../outside")
    assert list(outside.iterdir()) == []


def test_the_unit_file_gets_the_path_in_its_environment_with_specifiers_escaped() -> None:
    text = with_volumes(SLEEP, {"pg-data": Path("/v/50%/pg-data")})
    assert text.endswith('\n\n[Service]\nEnvironment="FLEET_VOLUME_pg_data=/v/50%%/pg-data"\n')
    assert File.parse(text).options[-1].value == '"FLEET_VOLUME_pg_data=/v/50%%/pg-data"'
    assert with_volumes(SLEEP, {}) == SLEEP


# --- the agent ---------------------------------------------------------------------------------


async def test_agent_makes_the_volume_records_it_and_hands_it_over_before_starting(tmp_path: Path) -> None:
    registry = memory_registry()
    systemd = FakeSystemd()
    agent = Agent(registry, systemd, Machine(A), ttl=5, volume_dir=tmp_path / "volumes")
    digest = await registry.put_unit_file(UnitFile.parse(SLEEP + "[X-Fleet]\nVolume=data\n"))
    await registry.assign(Assignment("db.service", A, digest, "launched"))
    tasks = await agent.reconcile(await registry.assignments(A))
    assert tasks.start == ["db.service"]
    assert await registry.volumes() == {"data": A}
    path = (tmp_path / "volumes" / "data").resolve()
    assert path.is_dir()
    assert f'Environment="FLEET_VOLUME_data={path}"' in systemd.files["db.service"]


async def test_agent_refuses_a_volume_that_lives_on_another_machine(tmp_path: Path) -> None:
    registry = memory_registry()
    systemd = FakeSystemd()
    await registry.claim_volume("data", B)
    agent = Agent(registry, systemd, Machine(A), ttl=5, volume_dir=tmp_path / "volumes")
    digest = await registry.put_unit_file(UnitFile.parse(SLEEP + "[X-Fleet]\nVolume=data\n"))
    good = await registry.put_unit_file(UnitFile.parse(SLEEP))
    await registry.assign(Assignment("db.service", A, digest, "launched"))
    await registry.assign(Assignment("other.service", A, good, "launched"))
    tasks = await agent.reconcile(await registry.assignments(A))
    assert tasks.start == ["other.service"] and "db.service" not in systemd.files
    assert "volume data lives on machine " + B in agent._quarantined["db.service"]
    assert await registry.volumes() == {"data": B}


async def test_agent_makes_a_shared_volume_in_the_shared_dir_hands_it_over_and_records_nothing(
    tmp_path: Path,
) -> None:
    registry = memory_registry()
    systemd = FakeSystemd()
    shared = tmp_path / "shared"
    shared.mkdir()
    agent = Agent(
        registry,
        systemd,
        Machine(A, shared_volumes=True),
        ttl=5,
        volume_dir=tmp_path / "volumes",
        shared_volume_dir=shared,
    )
    digest = await registry.put_unit_file(UnitFile.parse(SLEEP + "[X-Fleet]\nVolume=pg-data:shared logs\n"))
    await registry.assign(Assignment("db.service", A, digest, "launched"))
    tasks = await agent.reconcile(await registry.assignments(A))
    assert tasks.start == ["db.service"]
    assert await registry.volumes() == {"logs": A}  # the local one only: a shared one pins nothing
    path = (shared / "pg-data").resolve()
    assert path.is_dir() and stat.S_IMODE(os.lstat(path).st_mode) == 0o750
    assert not (tmp_path / "volumes" / "pg-data").exists()
    assert f'Environment="FLEET_VOLUME_pg_data={path}"' in systemd.files["db.service"]
    assert "FLEET_VOLUME_logs=" in systemd.files["db.service"]


async def test_agent_sets_aside_a_shared_volume_unit_without_a_shared_dir_or_with_it_unmounted(
    tmp_path: Path,
) -> None:
    registry = memory_registry()
    digest = await registry.put_unit_file(UnitFile.parse(SLEEP + "[X-Fleet]\nVolume=pg:shared\n"))
    good = await registry.put_unit_file(UnitFile.parse(SLEEP))
    await registry.assign(Assignment("db.service", A, digest, "launched"))
    await registry.assign(Assignment("other.service", A, good, "launched"))
    for shared_dir, why in (
        (None, "volume pg is shared and this fleetd has no shared volume directory (--shared-volume-dir)"),
        (tmp_path / "nfs", f"the shared volume directory {tmp_path / 'nfs'} is missing (is the shared"),
    ):
        systemd = FakeSystemd()
        agent = Agent(registry, systemd, Machine(A), ttl=5, shared_volume_dir=shared_dir)
        tasks = await agent.reconcile(await registry.assignments(A))
        assert tasks.start == ["other.service"] and "db.service" not in systemd.files
        assert why in agent._quarantined["db.service"]
    assert not (tmp_path / "nfs").exists()  # never made: it would hide the real storage
    (tmp_path / "nfs").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "pg").symlink_to(tmp_path)
    with pytest.raises(VolumeError, match="not a plain directory"):
        prepare_shared_volume(tmp_path / "nfs", "pg")


# --- the API -----------------------------------------------------------------------------------


async def test_api_refuses_a_bad_volume_at_the_door_lists_and_forgets_volumes() -> None:
    registry = memory_registry()
    await registry.register_machine(Machine(A, "10.0.0.1"), ttl=60)
    async with TestClient(TestServer(create_app(registry, machine_id=A))) as client:
        options = [
            {"section": "Service", "name": "ExecStart", "value": "/bin/sleep infinity"},
            {"section": "X-Fleet", "name": "Volume", "value": "../etc"},
        ]
        resp = await client.put(
            "/fleet/v1/units/db.service", json={"desiredState": "launched", "options": options}
        )
        assert resp.status == 400 and "may hold only letters" in (await resp.json())["error"]["message"]
        options[1]["value"] = "pg:nfs"
        resp = await client.put(
            "/fleet/v1/units/db.service", json={"desiredState": "launched", "options": options}
        )
        message = (await resp.json())["error"]["message"]
        assert resp.status == 400 and "unknown volume driver 'nfs'; write Volume=pg for" in message
        assert await registry.jobs() == []

        await registry.claim_volume("data", A)
        assert await (await client.get("/fleetpy/v1/volumes")).json() == {
            "volumes": [{"name": "data", "driver": "local", "machineID": A, "move": None, "units": []}]
        }
        # A shared volume is listed with the units naming it; a template's %i names none.
        for name, value in (("db.service", "data zz:shared"), ("web@.service", "web-%i:shared")):
            options[1]["value"] = value
            state = "inactive" if "@." in name else "loaded"
            resp = await client.put(
                f"/fleet/v1/units/{name}", json={"desiredState": state, "options": options}
            )
            assert resp.status == 201, await resp.text()
        assert (await (await client.get("/fleetpy/v1/volumes")).json())["volumes"] == [
            {"name": "data", "driver": "local", "machineID": A, "move": None, "units": ["db.service"]},
            {"name": "zz", "driver": "shared", "machineID": None, "move": None, "units": ["db.service"]},
        ]
        assert (await client.delete("/fleetpy/v1/volumes/data")).status == 204
        assert await registry.volumes() == {}
        assert (await client.delete("/fleetpy/v1/volumes/data")).status == 404
        assert (await client.delete("/fleetpy/v1/volumes/a..b")).status == 400


def test_draining_the_volume_machine_leaves_the_unit_waiting_with_both_reasons() -> None:
    machines = [Machine(A, cordoned=True), Machine(B)]
    p = plan(machines, [job("db.service", "Volume=data")], [], volumes={"data": A})
    assert p.assignments == ()
    assert str(p.pending["db.service"]) == (
        "0/2 machines fit: 1 machine is drained, 1 volume data lives on 1a2b0000..."
    )
