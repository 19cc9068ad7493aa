"""Self-fencing: an agent that cannot renew its heartbeat stops its fenced units before its TTL
runs out, so the engine moves them only after they stopped."""

from __future__ import annotations

import pytest

from fleetpy.unit import UnitFile
from fleetpy.unit.errors import InvalidFleetOptions
from fleetpy.unit.fleet import parse_fleet_options

SLEEP = "[Service]\nExecStart=/bin/sleep 1000\n"


def test_the_fence_option_is_a_boolean_of_x_fleet():
    fenced = UnitFile.parse(SLEEP + "[X-Fleet]\nFence=true\n")
    assert parse_fleet_options("a.service", fenced).fence
    assert not parse_fleet_options("a.service", UnitFile.parse(SLEEP)).fence
    with pytest.raises(InvalidFleetOptions, match="Fence='maybe' is not a boolean"):
        parse_fleet_options("a.service", UnitFile.parse(SLEEP + "[X-Fleet]\nFence=maybe\n"))
