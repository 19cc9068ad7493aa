"""Tests for unit file parsing, fleet's option form and canonical text."""

import hashlib

import pytest

from fleetpy.unit import InvalidUnitFile, UnitFile, UnitOption

SAMPLE = """\
# A comment
; another comment
[Unit]
Description = Hello world

[Service]
ExecStartPre=/bin/echo one
ExecStartPre=/bin/echo two
ExecStart=/bin/sleep \\
    1000
"""


def test_sections_and_options_are_read_in_order() -> None:
    unit = UnitFile.parse(SAMPLE)
    assert unit.options == (
        UnitOption("Unit", "Description", "Hello world"),
        UnitOption("Service", "ExecStartPre", "/bin/echo one"),
        UnitOption("Service", "ExecStartPre", "/bin/echo two"),
        UnitOption("Service", "ExecStart", "/bin/sleep 1000"),
    )
    assert unit.sections() == ["Unit", "Service"]


def test_repeated_keys_are_all_kept() -> None:
    unit = UnitFile.parse(SAMPLE)
    assert unit.values("Service", "ExecStartPre") == ["/bin/echo one", "/bin/echo two"]
    assert unit.values("Service", "Missing") == []


def test_whitespace_around_equals_is_trimmed() -> None:
    unit = UnitFile.parse("[Unit]\n  Description  =   spaced out  \n")
    assert unit.values("Unit", "Description") == ["spaced out"]


def test_value_may_contain_equals_signs() -> None:
    unit = UnitFile.parse("[Service]\nEnvironment=A=1 B=2\n")
    assert unit.values("Service", "Environment") == ["A=1 B=2"]


def test_empty_value_is_kept() -> None:
    assert UnitFile.parse("[Service]\nExecStart=\n").values("Service", "ExecStart") == [""]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("[S]\nK=a \\\n  b\n", "a b"),
        ("[S]\nK=a\\\nb \\\nc\n", "a b c"),
        ("[S]\nK=a \\\n# note\n; note\n  b\n", "a b"),
        ("[S]\nK=\\\nb\n", "b"),
        ("[S]\nK=a \\", "a"),
    ],
)
def test_backslash_continuation_joins_lines_with_one_space(text: str, value: str) -> None:
    assert UnitFile.parse(text).values("S", "K") == [value]


def test_windows_line_endings_and_bom_are_accepted() -> None:
    unit = UnitFile.parse("\ufeff[Unit]\r\nDescription=x\r\n")
    assert unit.values("Unit", "Description") == ["x"]


def test_reopened_section_is_merged_in_first_appearance_order() -> None:
    unit = UnitFile.parse("[A]\nx=1\n[B]\ny=2\n[A]\nz=3\n")
    assert [(o.section, o.name) for o in unit.options] == [
        ("A", "x"),
        ("A", "z"),
        ("B", "y"),
    ]
    assert unit == UnitFile.parse("[A]\nx=1\nz=3\n[B]\ny=2\n")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("Description=x\n", "line 1: option 'Description' comes before any section"),
        (
            "[Unit]\nDescription=x\njunk\n",
            "line 3: 'junk' is not a Key=Value assignment",
        ),
        ("[Unit\nDescription=x\n", "line 1: bad section header '[Unit'"),
        ("[Unit] extra\nA=b\n", "line 1: bad section header"),
        ("[]\nA=b\n", "line 1: section name is empty"),
        ("[Unit]\n=value\n", "line 2: option name is empty"),
        (
            "[Unit]\nBad Key=value\n",
            "line 2: option name 'Bad Key' may not contain spaces",
        ),
        ("\n\n[Unit]\nA=b \\\nc\njunk\n", "line 6:"),
    ],
)
def test_syntax_errors_name_the_line(text: str, fragment: str) -> None:
    with pytest.raises(InvalidUnitFile) as err:
        UnitFile.parse(text)
    assert fragment in str(err.value)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "[Unit]\n"])
def test_file_without_options_is_rejected(text: str) -> None:
    with pytest.raises(InvalidUnitFile, match="no options"):
        UnitFile.parse(text)


def test_canonical_text_separates_sections_with_blank_lines() -> None:
    assert UnitFile.parse(SAMPLE).to_text() == (
        "[Unit]\nDescription=Hello world\n\n"
        "[Service]\nExecStartPre=/bin/echo one\nExecStartPre=/bin/echo two\n"
        "ExecStart=/bin/sleep 1000\n"
    )


def test_parsing_canonical_text_gives_the_same_file() -> None:
    unit = UnitFile.parse(SAMPLE + "[X-Fleet]\nConflicts=a*\n[Unit]\nAfter=b.service\n")
    assert UnitFile.parse(unit.to_text()) == unit


def test_value_with_line_breaks_is_written_as_continuation() -> None:
    unit = UnitFile.from_options([{"section": "Service", "name": "ExecStart", "value": "a\nb"}])
    assert unit.to_text() == "[Service]\nExecStart=a\\\nb\n"
    # systemd joins continued lines with a space, and so do we on reading back.
    assert UnitFile.parse(unit.to_text()).values("Service", "ExecStart") == ["a b"]


def test_hash_is_sha1_of_canonical_text() -> None:
    unit = UnitFile.parse(SAMPLE)
    assert unit.hash == hashlib.sha1(unit.to_text().encode()).hexdigest()
    assert len(unit.hash) == 40


def test_formatting_differences_do_not_change_the_hash() -> None:
    messy = "# c\n[Unit]\n  Description =  Hello world\n\n\n[Service]\nExecStart=/bin/true\n"
    tidy = "[Unit]\nDescription=Hello world\n[Service]\nExecStart=/bin/true\n"
    assert UnitFile.parse(messy).hash == UnitFile.parse(tidy).hash


def test_different_content_changes_the_hash() -> None:
    assert UnitFile.parse("[U]\nA=1\n").hash != UnitFile.parse("[U]\nA=2\n").hash


def test_api_options_round_trip() -> None:
    options = [
        {"section": "Unit", "name": "Description", "value": "x"},
        {"section": "Service", "name": "ExecStart", "value": "/bin/true"},
    ]
    unit = UnitFile.from_options(options)
    assert unit.to_options() == options
    assert unit == UnitFile.parse(unit.to_text())


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ("nope", "must be a list"),
        ([], "empty"),
        (["x"], "option 0: expected an object"),
        ([{"section": "U", "name": "A"}], "option 0: missing value"),
        (
            [{"section": "U", "name": "A", "value": 1}],
            "option 0: value must be a string, not int",
        ),
        (
            [{"section": "", "name": "A", "value": ""}],
            "option 0: section name is empty",
        ),
        ([{"section": "U", "name": "", "value": ""}], "option 0: option name is empty"),
        ([{"section": "U]", "name": "A", "value": ""}], "may not contain brackets"),
        (
            [
                {"section": "U", "name": "A", "value": ""},
                {"section": "U", "name": "B=C", "value": ""},
            ],
            "option 1: option name 'B=C'",
        ),
    ],
)
def test_bad_api_options_are_rejected(options: object, fragment: str) -> None:
    with pytest.raises(InvalidUnitFile) as err:
        UnitFile.from_options(options)  # type: ignore[arg-type]
    assert fragment in str(err.value)


def test_unit_file_is_immutable() -> None:
    unit = UnitFile.parse(SAMPLE)
    with pytest.raises(AttributeError):
        unit.options = ()  # type: ignore[misc]
