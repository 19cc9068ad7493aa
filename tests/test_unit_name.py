"""Tests for unit name parsing and fleet's naming rules."""

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetpy.unit import (
    SUFFIXES,
    TEMPLATE_SUFFIXES,
    InvalidUnitName,
    UnitError,
    UnitName,
    validate_unit_name,
)
from fleetpy.unit.name import is_unit_name, mangle_unit_name


def test_plain_name_splits_into_prefix_and_suffix() -> None:
    name = UnitName.parse("hello.service")
    assert name == UnitName("hello.service", "hello", None, "service")
    assert not name.is_template and not name.is_instance
    assert name.template is None


def test_template_name_has_empty_instance() -> None:
    name = UnitName.parse("foo@.service")
    assert name.instance == ""
    assert name.is_template and not name.is_instance
    assert name.template is None


def test_instance_name_knows_its_template() -> None:
    name = UnitName.parse("foo@1.service")
    assert (name.prefix, name.instance, name.suffix) == ("foo", "1", "service")
    assert name.is_instance and not name.is_template
    assert name.template == "foo@.service"


def test_stem_is_name_without_type_suffix() -> None:
    assert UnitName.parse("foo@bar.baz.socket").stem == "foo@bar.baz"


def test_validate_unit_name_is_parse() -> None:
    assert validate_unit_name("a.timer") == UnitName.parse("a.timer")


@pytest.mark.parametrize("suffix", sorted(SUFFIXES))
def test_every_unit_type_suffix_is_accepted(suffix: str) -> None:
    assert UnitName.parse(f"x.{suffix}").suffix == suffix


@pytest.mark.parametrize("suffix", sorted(TEMPLATE_SUFFIXES))
def test_template_types_may_have_instances(suffix: str) -> None:
    assert UnitName.parse(f"x@1.{suffix}").instance == "1"


@pytest.mark.parametrize("suffix", sorted(SUFFIXES - TEMPLATE_SUFFIXES))
def test_other_types_cannot_be_templates(suffix: str) -> None:
    with pytest.raises(InvalidUnitName, match="can be templates or instances"):
        UnitName.parse(f"x@.{suffix}")


@pytest.mark.parametrize(
    "name",
    ["a-b_c:d.e.service", "A9.socket", "x.y@i.n.s.t.service", "web@a:b-c_d.timer"],
)
def test_all_allowed_characters_are_accepted(name: str) -> None:
    assert UnitName.parse(name).full == name


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("a b.service", "' '"),
        ("a/b.service", "'/'"),
        ("é.service", "'é'"),
        ("a%i.service", "'%'"),
    ],
)
def test_forbidden_character_is_rejected_and_named(name: str, bad: str) -> None:
    with pytest.raises(InvalidUnitName) as err:
        UnitName.parse(name)
    message = str(err.value)
    assert message.startswith(f'"{name}": unit names may contain only letters, digits')
    assert ":_.@-" in message and bad in message and "systemd-escape" in message


def test_a_lone_surrogate_is_a_forbidden_character_not_a_crash() -> None:
    # JSON's "\ud800" decodes to one; encoding it to count bytes used to raise UnicodeEncodeError.
    with pytest.raises(InvalidUnitName, match="unit names may contain only"):
        validate_unit_name("\ud800.service")


def test_path_traversal_name_is_rejected() -> None:
    with pytest.raises(InvalidUnitName, match=r'^"\.\./x\.service": unit names may contain only'):
        UnitName.parse("../x.service")


def test_name_without_suffix_lists_the_unit_types() -> None:
    with pytest.raises(InvalidUnitName) as err:
        UnitName.parse("hello")
    message = str(err.value)
    assert message.startswith('"hello": missing a unit type suffix such as .service')
    assert "automount, device" in message and "timer" in message


def test_unknown_suffix_is_called_out() -> None:
    with pytest.raises(InvalidUnitName, match=r'"\.txt" is not a unit type'):
        UnitName.parse("hello.txt")


def test_name_of_255_bytes_is_accepted() -> None:
    name = "a" * (255 - len(".service")) + ".service"
    assert UnitName.parse(name).full == name


def test_name_over_255_bytes_is_rejected() -> None:
    with pytest.raises(InvalidUnitName, match=r"at most 255 bytes long \(this one is 256\)"):
        UnitName.parse("a" * (256 - len(".service")) + ".service")


@pytest.mark.parametrize("name", [".service", "@1.service", "@.service"])
def test_empty_prefix_is_rejected(name: str) -> None:
    with pytest.raises(InvalidUnitName, match="nothing before"):
        UnitName.parse(name)


def test_the_first_at_sign_ends_the_prefix_and_the_rest_is_the_instance() -> None:
    # systemd: "everything past the first @ and before the last . is the instance"
    name = UnitName.parse("a@b@c.service")
    assert (name.prefix, name.instance, name.template) == ("a", "b@c", "a@.service")


def test_empty_name_is_rejected() -> None:
    with pytest.raises(InvalidUnitName, match="empty"):
        UnitName.parse("")


def test_non_string_name_is_rejected() -> None:
    with pytest.raises(InvalidUnitName, match="must be a string"):
        UnitName.parse(None)  # type: ignore[arg-type]


def test_unit_errors_are_value_errors() -> None:
    assert issubclass(InvalidUnitName, UnitError) and issubclass(UnitError, ValueError)


# systemd's unit_name_is_valid (src/basic/unit-name.c), each checked with `systemctl link`.
@pytest.mark.parametrize(
    ("name", "prefix", "instance"),
    [
        ("foo\\x2dbar.service", "foo\\x2dbar", None),  # systemd-escape "foo-bar"
        ("dev-sda\\x2d1.device", "dev-sda\\x2d1", None),
        ("a\\b.service", "a\\b", None),  # backslash is a name character; escapes are not checked
        ("web@a\\x2db.service", "web", "a\\x2db"),
        ("a..service", "a.", None),  # B1: valid for systemd, so valid for every fleetpy layer
        ("..service", ".", None),
        ("a@@.service", "a", "@"),
    ],
)
def test_names_systemd_accepts_are_accepted(name: str, prefix: str, instance: str | None) -> None:
    parsed = UnitName.parse(name)
    assert (parsed.full, parsed.prefix, parsed.instance) == (name, prefix, instance)


@pytest.mark.parametrize("suffix", ["snapshot", "busname"])
def test_unit_types_systemd_removed_are_refused(suffix: str) -> None:
    with pytest.raises(InvalidUnitName, match=f'current systemd has no ".{suffix}" units'):
        UnitName.parse(f"x.{suffix}")


@given(
    st.text(alphabet=st.sampled_from("ab.@/\\:-_x2d %\x00\n~é"), max_size=12).map(lambda s: s + ".service")
)
def test_every_valid_name_is_a_file_directly_inside_the_unit_dir(name: str) -> None:
    # The agent writes a unit to unit_dir/name: a valid name must never leave that directory.
    if not is_unit_name(name):
        return
    unit_dir = Path("/srv/units")
    assert "/" not in name and name not in (".", "..") and "\x00" not in name
    assert os.path.normpath(unit_dir / name) == str(unit_dir / name)
    assert (unit_dir / name).parent == unit_dir


@given(st.text(max_size=30))
def test_is_unit_name_agrees_with_parse(name: str) -> None:
    try:
        UnitName.parse(name)
    except InvalidUnitName:
        assert not is_unit_name(name)
    else:
        assert is_unit_name(name)


def test_fleetctl_arguments_name_units_as_fleet_mangles_them() -> None:
    assert mangle_unit_name("units/hello") == "hello.service"
    assert mangle_unit_name("./web@1.service") == "web@1.service"
    assert mangle_unit_name("/srv/db.socket") == "db.socket"
    assert mangle_unit_name("app.v2") == "app.v2.service"  # not a unit type
