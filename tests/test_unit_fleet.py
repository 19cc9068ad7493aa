"""Tests for [X-Fleet] options, specifiers and loading whole units."""

import pytest

from fleetpy.unit import (
    FleetOptions,
    InvalidFleetOptions,
    InvalidUnitFile,
    InvalidUnitName,
    UnitFile,
    UnitName,
    expand_specifiers,
    load_unit,
    parse_fleet_options,
)


def fleet(body: str, name: str = "web.service") -> FleetOptions:
    return parse_fleet_options(name, UnitFile.parse("[Service]\nExecStart=/bin/true\n[X-Fleet]\n" + body))


def test_unit_without_fleet_section_has_no_requirements() -> None:
    options = parse_fleet_options("a.service", UnitFile.parse("[Service]\nExecStart=/bin/true\n"))
    assert options == FleetOptions()
    assert options.metadata_matches({}) and not options.conflicts_with("b.service")


def test_all_options_are_read() -> None:
    options = fleet("MachineID=abc123\nMachineOf=db.service\nMachineMetadata=role=web\nConflicts=web*\n")
    assert options.machine_id == "abc123"
    assert options.machine_of == ("db.service",)
    assert options.machine_metadata == (("role", frozenset({"web"})),)
    assert options.conflicts == ("web*",)
    assert not options.is_global and options.replaces == () and options.warnings == ()


def test_metadata_pairs_may_be_quoted_on_one_line() -> None:
    options = fleet('MachineMetadata="region=us-east" "disk=ssd"\n')
    assert dict(options.machine_metadata) == {
        "region": frozenset({"us-east"}),
        "disk": frozenset({"ssd"}),
    }


def test_metadata_values_may_contain_spaces_when_quoted() -> None:
    options = fleet('MachineMetadata="room=big hall"\n')
    assert options.metadata_matches({"room": "big hall"})


@pytest.mark.parametrize(
    ("metadata", "matches"),
    [
        ({"region": "us-east", "disk": "ssd"}, True),
        ({"region": "us-west", "disk": "ssd", "extra": "x"}, True),
        ({"region": "eu", "disk": "ssd"}, False),
        ({"region": "us-east"}, False),
        ({}, False),
    ],
)
def test_metadata_keys_must_all_match_and_repeated_key_is_any_of(
    metadata: dict[str, str], matches: bool
) -> None:
    options = fleet('MachineMetadata="region=us-east" "disk=ssd"\nMachineMetadata=region=us-west\n')
    assert options.metadata_matches(metadata) is matches


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        # fleet split each entry at "=" and ignored any that did not give two non-empty parts
        ("region", "'region' is not a key=value pair, so fleet ignored it"),
        ("=x", "'=x' is not a key=value pair"),
        ("region=", "'region=' is not a key=value pair"),
        ("a=b=c", "'a=b=c' is not a key=value pair"),
        ('"region=us east=1"', "'region=us east=1' is not a key=value pair"),
        ('"region=us', "fleet reads quotes only around whole words"),
        ('region="us"', "fleet reads quotes only around whole words"),
        ('"region=us" "disk', "cannot be read"),
        ("", "MachineMetadata= is empty"),
    ],
)
def test_bad_metadata_is_rejected(value: str, fragment: str) -> None:
    with pytest.raises(InvalidFleetOptions) as err:
        fleet(f"MachineMetadata={value}\n")
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("other", "conflicts"),
    [
        ("web.service", True),
        ("webby@1.service", True),
        ("db.service", False),
        ("aweb.service", False),
    ],
)
def test_conflicts_are_globs_on_other_unit_names(other: str, conflicts: bool) -> None:
    assert fleet("Conflicts=web*\nConflicts=x?.service\n").conflicts_with(other) is conflicts


def test_conflicts_apply_in_one_direction_only() -> None:
    assert fleet("Conflicts=db*\n").conflicts_with("db.service")
    assert not fleet("", name="db.service").conflicts_with("web.service")


@pytest.mark.parametrize("value", ["true", "True", "yes", "1", "on"])
def test_global_accepts_systemd_true_values(value: str) -> None:
    assert fleet(f"Global={value}\n").is_global


@pytest.mark.parametrize("value", ["false", "no", "0", "off"])
def test_global_accepts_systemd_false_values(value: str) -> None:
    assert not fleet(f"Global={value}\n").is_global


def test_global_that_is_not_a_boolean_is_rejected() -> None:
    with pytest.raises(InvalidFleetOptions, match="Global='maybe' is not a boolean; fleet read it as false"):
        fleet("Global=maybe\n")


def test_last_global_assignment_wins() -> None:
    assert not fleet("Global=true\nGlobal=false\n").is_global


def test_global_may_be_combined_with_metadata_and_conflicts() -> None:
    options = fleet("Global=true\nMachineMetadata=role=web\nConflicts=x*\n")
    assert options.is_global and options.conflicts == ("x*",)


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ("MachineID=abc\n", "MachineID"),
        ("MachineOf=db.service\n", "MachineOf"),
        ("Replaces=old.service\n", "Replaces"),
    ],
)
def test_global_with_placement_option_is_rejected(body: str, named: str) -> None:
    with pytest.raises(InvalidFleetOptions, match=f"Global=true cannot be combined with {named}"):
        fleet("Global=true\n" + body)


def test_placement_options_are_fine_when_global_is_false() -> None:
    assert fleet("Global=false\nMachineID=abc\n").machine_id == "abc"


def test_replaces_with_conflicts_is_rejected() -> None:
    with pytest.raises(InvalidFleetOptions, match="Replaces cannot be combined with Conflicts"):
        fleet("Replaces=old.service\nConflicts=x*\n")


def test_replaces_lists_unit_names() -> None:
    assert fleet("Replaces=a.service b.service\nReplaces=c.service\n").replaces == (
        "a.service",
        "b.service",
        "c.service",
    )


def test_invalid_unit_name_in_machine_of_is_rejected() -> None:
    with pytest.raises(InvalidFleetOptions) as err:
        fleet("MachineOf=nosuffix\n")
    assert "MachineOf=nosuffix is not a unit name" in str(err.value)
    assert "missing a unit type suffix" in str(err.value)


@pytest.mark.parametrize("key", ["Conflicts", "Replaces"])
@pytest.mark.parametrize("pattern", ["web@[", "web@[]", "web@[-1]", "web@[\\]"])
def test_malformed_glob_in_conflicts_or_replaces_is_rejected(key: str, pattern: str) -> None:
    with pytest.raises(InvalidFleetOptions, match=f"{key}=.* is not a glob fleet could match"):
        fleet(f"{key}={pattern}\n")


@pytest.mark.parametrize("key", ["MachineOf", "Replaces", "Conflicts", "MachineID"])
def test_empty_value_is_rejected(key: str) -> None:
    with pytest.raises(InvalidFleetOptions, match=key):
        fleet(f"{key}=\n")


def test_machine_id_given_twice_is_rejected() -> None:
    with pytest.raises(InvalidFleetOptions, match="MachineID is given 2 times"):
        fleet("MachineID=a\nMachineID=b\n")


def test_machine_id_with_several_words_is_rejected() -> None:
    with pytest.raises(InvalidFleetOptions, match="exactly one machine ID"):
        fleet("MachineID=a b\n")


def test_unknown_option_is_named_and_valid_ones_listed() -> None:
    with pytest.raises(InvalidFleetOptions) as err:
        fleet("MachineIDs=abc\n")
    message = str(err.value)
    assert "unknown [X-Fleet] option 'MachineIDs'" in message
    for valid in (
        "MachineID",
        "MachineOf",
        "MachineMetadata",
        "Conflicts",
        "Global",
        "Replaces",
    ):
        assert valid in message


@pytest.mark.parametrize(
    ("old", "new", "body", "expected"),
    [
        ("X-ConditionMachineID", "MachineID", "abc", {"machine_id": "abc"}),
        (
            "X-ConditionMachineOf",
            "MachineOf",
            "db.service",
            {"machine_of": ("db.service",)},
        ),
        (
            "X-ConditionMachineMetadata",
            "MachineMetadata",
            "a=b",
            {"machine_metadata": (("a", frozenset({"b"})),)},
        ),
        ("X-Conflicts", "Conflicts", "x*", {"conflicts": ("x*",)}),
    ],
)
def test_deprecated_names_still_work_with_a_warning(old: str, new: str, body: str, expected: dict) -> None:
    options = fleet(f"{old}={body}\n")
    assert options == FleetOptions(**expected)
    (warning,) = options.warnings
    assert old in warning and f"use {new} instead" in warning


def test_machine_boot_id_is_no_longer_supported() -> None:
    with pytest.raises(InvalidFleetOptions, match="X-ConditionMachineBootID is no longer supported"):
        fleet("X-ConditionMachineBootID=abc\n")


def test_options_outside_the_fleet_section_are_ignored() -> None:
    unit = UnitFile.parse("[Unit]\nConflicts=other.service\nMachineID=x\n")
    assert parse_fleet_options("a.service", unit) == FleetOptions()


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("%n", "foo@bar.service"),
        ("%N", "foo@bar"),
        ("%p", "foo"),
        ("%i", "bar"),
        # fleet replaced only %n %N %p %i; "%%" stays as it is
        ("%%", "%%"),
        ("%p-%i.%%", "foo-bar.%%"),
        ("50%", "50%"),
        ("%x", "%x"),
    ],
)
def test_specifiers_expand_from_the_unit_name(template: str, expected: str) -> None:
    assert expand_specifiers(template, UnitName.parse("foo@bar.service")) == expected


def test_specifiers_expand_inside_fleet_options() -> None:
    options = fleet(
        "MachineOf=%p.socket\nConflicts=%p@*.service\nMachineMetadata=slot=%i\n",
        name="web@2.service",
    )
    assert options.machine_of == ("web.socket",)
    assert options.conflicts == ("web@*.service",)
    assert options.metadata_matches({"slot": "2"})


def test_expanded_value_is_validated_as_a_unit_name() -> None:
    with pytest.raises(InvalidFleetOptions, match="MachineOf=web-%%"):
        fleet("MachineOf=%p-%%.service\n")


def test_load_unit_from_text() -> None:
    unit = load_unit("db@1.service", "[Service]\nExecStart=/bin/db\n[X-Fleet]\nMachineOf=%p.socket\n")
    assert unit.name == UnitName.parse("db@1.service")
    assert unit.fleet.machine_of == ("db.socket",)
    assert unit.hash == unit.file.hash


def test_load_unit_from_parsed_file() -> None:
    file = UnitFile.parse("[Service]\nExecStart=/bin/true\n")
    assert load_unit("a.service", file).file is file


def test_template_keeps_its_instance_specifier_for_each_instance() -> None:
    text = "[Service]\nExecStart=/bin/true\n[X-Fleet]\nConflicts=web@%i*\n"
    assert load_unit("web@.service", text).fleet.conflicts == ("web@%i*",)
    assert load_unit("web@3.service", text).fleet.conflicts == ("web@3*",)


@pytest.mark.parametrize(
    ("name", "text", "error"),
    [
        ("bad name.service", "[Service]\nExecStart=/bin/true\n", InvalidUnitName),
        ("a.service", "ExecStart=/bin/true\n", InvalidUnitFile),
        ("a.service", "[X-Fleet]\nGlobal=perhaps\n", InvalidFleetOptions),
    ],
)
def test_load_unit_reports_the_first_problem(name: str, text: str, error: type) -> None:
    with pytest.raises(error):
        load_unit(name, text)


def _fleet(text: str, name: str = "r.service"):
    return parse_fleet_options(name, UnitFile.parse("[Service]\nExecStart=/bin/true\n" + text))


def test_requests_come_from_x_fleet_first_then_from_systemds_own_limits() -> None:
    assert (
        _fleet("MemoryMax=512M\nCPUQuota=50%\n").memory_request,
        _fleet("CPUQuota=50%\n").cpu_request,
    ) == (
        512 * 1024**2,
        0.5,
    )
    fleet = _fleet("MemoryMax=512M\n[X-Fleet]\nMemoryRequest=1.5G\nCPURequest=2\n")
    assert (fleet.memory_request, fleet.cpu_request) == (int(1.5 * 1024**3), 2.0)
    # systemd's last assignment wins, an empty one resets, infinity is no limit.
    assert _fleet("MemoryMax=1G\nMemoryMax=\n").memory_request == 0
    assert _fleet("MemoryMax=infinity\n").memory_request == 0
    assert _fleet("MemoryLimit=2K\n").memory_request == 2048
    # A relative limit reserves nothing, and says so.
    fleet = _fleet("MemoryMax=50%\n")
    assert fleet.memory_request == 0 and "MemoryRequest=" in fleet.warnings[0]
    assert _fleet("").requests is False


def test_machine_constraints_compare_text_sets_regexes_numbers_and_versions() -> None:
    fleet = _fleet('[X-Fleet]\nMachineConstraint="zone!={b,c}" os==/^lin/ "memory>=2G" "kernel>5.9"\n')
    good = {"zone": "a", "os": "linux", "memory": 4 * 1024**3, "kernel": "5.10.0-26-amd64"}
    assert fleet.failed_constraint(good) is None
    assert str(fleet.failed_constraint({**good, "zone": "b"})) == "zone!={b,c}"
    assert str(fleet.failed_constraint({**good, "os": "freebsd"})) == "os==/^lin/"
    assert str(fleet.failed_constraint({**good, "memory": 1024**3})) == "memory>=2G"
    assert str(fleet.failed_constraint({**good, "kernel": "5.9"})) == "kernel>5.9"
    # A missing key passes only !=; text that is neither number nor version never compares.
    assert str(fleet.failed_constraint({k: v for k, v in good.items() if k != "os"})) == "os==/^lin/"
    assert fleet.failed_constraint({k: v for k, v in good.items() if k != "zone"}) is None
    assert str(fleet.failed_constraint({**good, "kernel": "unknown"})) == "kernel>5.9"
    assert _fleet("[X-Fleet]\nMachineConstraint=cpus==2\n").failed_constraint({"cpus": 2.0}) is None
