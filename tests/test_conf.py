"""The bottom layer: durations, metadata and machine ids as fleet writes them, and atomic files."""

from __future__ import annotations

import pytest

from fleetpy.conf.files import write_atomic
from fleetpy.conf.values import (
    BadValue,
    format_metadata,
    parse_agent_ttl,
    parse_duration,
    parse_metadata,
    short_machine_id,
)


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("10s", 10),
        ("1m30s", 90),
        ("500ms", 0.5),
        ("7", 7),
        ("2.5", 2.5),
        ("1h", 3600),
        ("+3s", 3),
        (".5s", 0.5),
    ],
)
def test_go_durations_and_bare_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["ten", "10", "", "5 s", "10sec", "1m-30s"][:1] + ["", "5 s", "10sec", "1m-30s"]
)
def test_what_is_not_a_duration(text: str) -> None:
    with pytest.raises(BadValue, match="use seconds"):
        parse_duration(text)


def test_negative_durations_are_refused_by_name() -> None:
    with pytest.raises(BadValue, match="cannot be negative"):
        parse_duration("-5s")


def test_agent_ttl_is_at_least_a_second() -> None:
    assert parse_agent_ttl("1s") == 1
    with pytest.raises(BadValue, match="at least 1s"):
        parse_agent_ttl("500ms")


def test_metadata_pairs_need_a_key_and_a_value() -> None:
    assert parse_metadata('"role=web, zone=a"') == {"role": "web", "zone": "a"}
    assert parse_metadata("") == {}
    for bad in ("role=", "=web", "role"):
        with pytest.raises(BadValue, match="expected key=value"):
            parse_metadata(bad)


def test_metadata_round_trips_through_its_text() -> None:
    metadata = {"role": "db", "zone": "b"}
    assert parse_metadata(format_metadata(metadata)) == metadata


def test_short_machine_id() -> None:
    assert short_machine_id("1abb93b9c0ffee") == "1abb93b9..."
    assert short_machine_id("abc") == "abc"


def test_atomic_write_replaces_the_whole_file_and_leaves_no_temporary(tmp_path) -> None:
    path = tmp_path / "state.json"
    path.write_text("old")
    write_atomic(path, "new", mode=0o600)
    assert path.read_text() == "new" and (path.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "unit.service"
    path.write_text("old")

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, b"new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["unit.service"]
