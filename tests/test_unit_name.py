"""Tests for unit name parsing and fleet's naming rules."""

import pytest

from fleetpy.unit import (
    SUFFIXES,
    TEMPLATE_SUFFIXES,
    InvalidUnitName,
    UnitError,
    UnitName,
    validate_unit_name,
)


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
    assert ":_.@-" in message and bad in message


def test_path_traversal_name_is_rejected() -> None:
    with pytest.raises(InvalidUnitName, match=r'^"\.\./x\.service": unit names may contain only'):
        UnitName.parse("../x.service")


def test_name_without_suffix_lists_the_unit_types() -> None:
    with pytest.raises(InvalidUnitName) as err:
        UnitName.parse("hello")
    message = str(err.value)
    assert message.startswith('"hello": missing a unit type suffix such as .service')
    assert "automount, busname" in message and "timer" in message


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


def test_more_than_one_at_sign_is_rejected() -> None:
    with pytest.raises(InvalidUnitName, match='at most one "@"'):
        UnitName.parse("a@b@c.service")


def test_empty_name_is_rejected() -> None:
    with pytest.raises(InvalidUnitName, match="empty"):
        UnitName.parse("")


def test_non_string_name_is_rejected() -> None:
    with pytest.raises(InvalidUnitName, match="must be a string"):
        UnitName.parse(None)  # type: ignore[arg-type]


def test_unit_errors_are_value_errors() -> None:
    assert issubclass(InvalidUnitName, UnitError) and issubclass(UnitError, ValueError)
