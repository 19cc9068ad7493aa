"""Durations and metadata as fleet writes them: one reader for fleetd, cloud-config and the lab."""

from __future__ import annotations

import pytest

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
