"""Property tests: whatever the door accepts, every later layer reads the same way.

The door is what the API runs on a PUT: `UnitFile.from_options` on the options and
`load_unit` on the name with the file. Inputs are drawn with the characters that have
broken unit files before (line ends, NUL, backslashes, comment and section starts).
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fleetpy.registry import memory_registry
from fleetpy.unit import UnitError, UnitFile, load_unit
from fleetpy.unit.name import is_unit_name

TRICKY = "\\\n\r\t \x00\x0b\x0c\x1c\x85\u2028\u2029#;[]=\"'%@.x"
CHARS = st.one_of(
    st.sampled_from(TRICKY),
    st.characters(blacklist_categories=()),  # surrogates included
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),
)
TEXT = st.text(CHARS, max_size=24)
PLAIN = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=24)
WORDS = st.lists(
    st.sampled_from(
        ["true", "y", "yes", "web@*.service", "db.service", "a=b", "c=d", "%i", "hostname=%i", "[^1]"]
    ),
    min_size=1,
    max_size=3,
).map(" ".join)
SECTIONS = st.one_of(st.sampled_from(["Unit", "Service", "X-Fleet", "Install"]), TEXT)
NAMES = st.one_of(
    st.sampled_from(
        [
            "ExecStart",
            "Description",
            "Conflicts",
            "Global",
            "MachineMetadata",
            "MachineOf",
            "Replaces",
            "MachineID",
        ]
    ),
    st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,8}", fullmatch=True),
    TEXT,
)
VALUES = st.one_of(PLAIN, TEXT, WORDS, WORDS.map(lambda w: '"' + w.replace(" ", '" "') + '"'))
GENERIC = st.lists(
    st.fixed_dictionaries({"section": SECTIONS, "name": NAMES, "value": VALUES}), min_size=1, max_size=6
)
FLEET_KEYS = ["MachineID", "MachineOf", "MachineMetadata", "Conflicts", "Global", "Replaces", "X-Conflicts"]
FLEET = st.lists(
    st.fixed_dictionaries(
        {
            "section": st.just("X-Fleet"),
            "name": st.sampled_from(FLEET_KEYS),
            "value": st.one_of(WORDS, VALUES),
        }
    ),
    min_size=1,
    max_size=3,
).map(lambda fleet: [{"section": "Service", "name": "ExecStart", "value": "/bin/true"}, *fleet])
OPTIONS = st.one_of(GENERIC, FLEET)
UNIT_NAMES = st.one_of(
    st.sampled_from(["a.service", "web@.service", "web@1.service", "a..service", "foo\\x2dbar.service"]),
    TEXT.map(lambda s: s + ".service"),
)
# How many examples: the profile loaded in conftest (a few in the fast subset, 400 in the full run).
PROPERTIES = settings(suppress_health_check=[HealthCheck.too_slow])


def door(name: str, options: list[dict]):
    """What the API does with a PUT: the file, then the name with the file; UnitError is a 400."""
    unit_file = UnitFile.from_options(options)
    return unit_file, load_unit(name, unit_file)


@PROPERTIES
@given(OPTIONS)
def test_accepted_options_read_back_unchanged_from_their_text(options: list[dict]) -> None:
    try:
        unit_file = UnitFile.from_options(options)
    except UnitError:
        return
    text = unit_file.to_text()
    assert UnitFile.parse(text) == unit_file
    assert UnitFile.parse(text).to_text() == text
    # One physical line per option (plus headers and blank separators): nothing hides a line.
    assert text.count("\n") == len(unit_file.options) + 2 * len(unit_file.sections()) - 1
    # fleetctl rebuilds the file from the API's JSON form: same file, same hash.
    assert UnitFile.from_options(unit_file.to_options()) == unit_file
    assert UnitFile.from_options(unit_file.to_options()).hash == unit_file.hash


@PROPERTIES
@given(UNIT_NAMES, OPTIONS)
@example(
    "\ud800.service", [{"section": "Service", "name": "ExecStart", "value": "/bin/true"}]
)  # found by 400
def test_every_later_layer_agrees_with_the_door(name: str, options: list[dict]) -> None:
    try:
        unit_file, unit = door(name, options)
    except UnitError:
        return
    # registry: the text stored in etcd parses back to the same file under the same hash
    registry = memory_registry()

    async def round_trip():
        digest = await registry.put_unit_file(unit_file)
        return digest, await registry.unit_file(digest)

    digest, stored = asyncio.run(round_trip())
    assert stored == unit_file and stored.hash == digest
    # engine: the stored unit loads, with the same [X-Fleet] reading
    assert load_unit(name, stored) == unit
    # agent and systemd manager: the name is a file name inside the unit dir
    assert is_unit_name(name) and "/" not in name


@pytest.mark.parametrize(
    "options",
    [
        [{"section": "Service", "name": "ExecStart", "value": "/bin/a \\\n b"}],
        [{"section": "Service", "name": "ExecStart", "value": "a\\\\"}],
        [{"section": "X-Fleet", "name": "Conflicts", "value": '"web@[^1].service" "db.service"'}],
    ],
)
def test_known_tricky_units_pass_the_round_trip(options: list[dict]) -> None:
    unit_file, unit = door("a.service", options)
    assert UnitFile.parse(unit_file.to_text()) == unit_file
    assert load_unit("a.service", UnitFile.parse(unit_file.to_text())) == unit
