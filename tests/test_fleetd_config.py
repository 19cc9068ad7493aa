"""fleetd's configuration: flags over FLEET_* variables over the config file, as fleet does it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetpy.fleetd.config import ConfigError, build_config, machine_id, parse_duration
from fleetpy.fleetd.daemon import build_fleetd
from fleetpy.registry import memory_registry
from fleetpy.systemd.fake import FakeSystemd


def test_flags_beat_environment_which_beats_the_file(tmp_path):
    conf = tmp_path / "fleet.conf"
    conf.write_text(
        '# fleet.conf\netcd_servers=["http://10.0.0.1:2379","http://10.0.0.2:2379"]\n'
        'public_ip="10.0.0.9"\nmetadata="role=web,zone=a"\nagent_ttl="30s"\n'
        "disable_engine=true\n"
    )
    config = build_config(
        {"public_ip": None, "agent_ttl": "5s"},
        {"FLEET_PUBLIC_IP": "10.0.0.8", "FLEET_METADATA": "role=db"},
        str(conf),
    )
    assert config.etcd_servers == ("http://10.0.0.1:2379", "http://10.0.0.2:2379")
    assert config.public_ip == "10.0.0.8"
    assert config.metadata == {"role": "db"}
    assert config.agent_ttl == 5.0
    assert config.disable_engine is True


def test_defaults_without_any_source(tmp_path):
    config = build_config({}, {"FLEET_CONFIG": str(tmp_path / "absent.conf")})
    assert config.etcd_servers == ("http://127.0.0.1:2379",)
    assert config.api_socket == "/var/run/fleet.sock" and config.agent_ttl == 10.0


@pytest.mark.parametrize("text,seconds", [("10s", 10), ("1m30s", 90), ("500ms", 0.5), ("7", 7)])
def test_go_style_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "flags,message",
    [
        ({"agent_ttl": "ten"}, "bad duration"),
        ({"metadata": "role"}, "expected key=value"),
        ({"disable_engine": "maybe"}, "bad boolean"),
        ({"agent_ttl": "0.5s"}, "at least 1s"),
        ({"events_retention": "-1h"}, "cannot be negative"),
    ],
)
def test_bad_values_say_what_to_write(flags, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        build_config(flags, {"FLEET_CONFIG": str(tmp_path / "absent.conf")})


def test_unknown_option_in_the_file_is_an_error(tmp_path):
    conf = tmp_path / "fleet.conf"
    conf.write_text("etcd_servrs=http://x\n")
    with pytest.raises(ConfigError, match="fleet.conf:1: unknown option 'etcd_servrs'"):
        build_config({}, {}, str(conf))


def test_machine_id_is_generated_once_and_kept(tmp_path, monkeypatch):
    config = build_config(
        {"machine_id_file": str(tmp_path / "machine-id")}, {"FLEET_CONFIG": str(tmp_path / "absent.conf")}
    )
    monkeypatch.setattr("fleetpy.fleetd.config.SYSTEM_MACHINE_ID", str(tmp_path / "no-such-file"))
    first = machine_id(config)
    assert len(first) == 32 and machine_id(config) == first


def test_events_retention_defaults_to_a_day_and_reaches_the_engine(tmp_path):
    absent = {"FLEET_CONFIG": str(tmp_path / "absent.conf")}
    assert build_config({}, absent).events_retention == 86400
    config = build_config({"machine_id": "m1"}, {**absent, "FLEET_EVENTS_RETENTION": "2h"})
    assert config.events_retention == 7200
    engine = build_fleetd(config, memory_registry(), FakeSystemd()).engine
    assert engine is not None and engine.events.retention == 7200


def test_the_shared_volume_dir_is_an_absolute_path_and_the_machine_record_says_it_has_one(tmp_path):
    absent = {"FLEET_CONFIG": str(tmp_path / "absent.conf")}
    without = build_config({"machine_id": "m1"}, absent)
    assert without.shared_volume_dir == ""
    assert not build_fleetd(without, memory_registry(), FakeSystemd()).machine.shared_volumes
    conf = tmp_path / "fleet.conf"
    conf.write_text('shared_volume_dir="/mnt/file"\n')
    config = build_config({"machine_id": "m1"}, {"FLEET_SHARED_VOLUME_DIR": "/mnt/env"}, str(conf))
    assert config.shared_volume_dir == "/mnt/env"
    fleetd = build_fleetd(config, memory_registry(), FakeSystemd())
    assert fleetd.machine.shared_volumes and fleetd.agent.shared_volume_dir == Path("/mnt/env")
    with pytest.raises(ConfigError, match="shared_volume_dir 'mnt' must be an absolute path"):
        build_config({"shared_volume_dir": "mnt"}, absent)
