"""Tests for unit file parsing, fleet's option form and canonical text."""

import hashlib

import pytest

from fleetpy.unit import InvalidUnitFile, UnitFile, UnitOption, syntax
from fleetpy.unit.syntax import swallowed_by_comments

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
        # systemd's continuation: the backslash becomes a space, the next line is kept as is.
        UnitOption("Service", "ExecStart", "/bin/sleep      1000"),
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


# systemd.syntax(5) and config_parse(), checked against systemd 252's `systemctl show`.
@pytest.mark.parametrize(
    ("text", "value"),
    [
        # the backslash becomes a space and the next line is appended with its whitespace
        ("[S]\nK=a \\\n  b\n", "a    b"),
        ("[S]\nK=a\\\nb \\\nc\n", "a b  c"),
        # comment lines inside a continuation are skipped
        ("[S]\nK=a \\\n# note\n; note\n  b\n", "a    b"),
        ("[S]\nK=\\\nb\n", "b"),
        # a continuation at the end of the file ends the value
        ("[S]\nK=a \\", "a"),
        # a blank line ends a continuation
        ("[S]\nK=a \\\n\nL=b\n", "a"),
        # an escaped backslash does not continue the line
        ("[S]\nK=a\\\\\nL=b\n", "a\\\\"),
        # tabs inside a value are kept, spaces and tabs around it dropped
        ("[S]\nK=\t a\tb \t\n", "a\tb"),
    ],
)
def test_continuations_and_blanks_read_as_systemd_reads_them(text: str, value: str) -> None:
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
        "ExecStart=/bin/sleep      1000\n"
    )


def test_parsing_canonical_text_gives_the_same_file() -> None:
    unit = UnitFile.parse(SAMPLE + "[X-Fleet]\nConflicts=a*\n[Unit]\nAfter=b.service\n")
    assert UnitFile.parse(unit.to_text()) == unit


def test_api_value_in_fleets_continued_form_is_read_as_systemd_reads_it() -> None:
    # Go fleetctl sends a continued value as go-systemd read it: backslash, newline and all.
    unit = UnitFile.from_options([{"section": "Service", "name": "ExecStart", "value": "/bin/a \\\n  -b"}])
    assert unit.values("Service", "ExecStart") == ["/bin/a    -b"]
    assert unit.to_text() == "[Service]\nExecStart=/bin/a    -b\n"
    assert UnitFile.parse(unit.to_text()) == unit


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


# Inputs that systemd and fleet would read apart, or that would smuggle a directive past
# `fleetctl cat`: each is refused with the line and the reason.
@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        # systemd ends a line at a lone CR (and at NUL); fleet did not
        ("[Service]\nDescription=a\rExecStartPre=/bin/evil\n", "line 2: U+000D (CARRIAGE RETURN)"),
        ("[Service]\nX\x00ExecStartPre=/bin/evil\n", "line 2: U+0000 (NUL)"),
        ("[Service]\n# note\rExecStartPre=/bin/evil\n", "line 2: U+000D"),
        # Python's splitlines breaks here, systemd and fleet do not: refused, never split
        ("[Service]\nDescription=a\x85ExecStartPre=/bin/evil\n", "holds U+0085"),
        ("[Service]\nDescription=a\x0bExecStartPre=/bin/evil\n", "holds U+000B"),
        ("[Service]\nDescription=a\u2028ExecStartPre=/bin/evil\n", "holds U+2028 (LINE SEPARATOR)"),
        ("[Serv\x1cice]\nA=b\n", "line 1: section name"),
        # a space after the backslash: systemd and fleet see two directives
        (
            "[Service]\nExecStart=/bin/foo \\ \nExecStartPre=/bin/bar\n",
            "line 2: ExecStart= ends in a backslash",
        ),
        # systemd reads "[ Service ]" as another section, and refuses quotes in a header
        ("[ Service ]\nExecStart=/bin/true\n", "has blanks around it"),
        ('[Ser"vice]\nExecStart=/bin/true\n', "quotes"),
        ("[Service]\n#Key=x\n;K=y\n[Unit]\n#x=\n", "no options"),
    ],
)
def test_text_that_would_change_meaning_is_refused(text: str, fragment: str) -> None:
    with pytest.raises(InvalidUnitFile) as err:
        UnitFile.parse(text)
    assert fragment in str(err.value)


def test_comment_ending_in_backslash_does_not_swallow_the_next_line() -> None:
    # Current systemd: the comment ends at its line end (fleet's go-systemd continued it).
    text = "[Service]\n# old: \\\nExecStartPre=/bin/revived\nExecStart=/bin/true\n"
    assert UnitFile.parse(text).values("Service", "ExecStartPre") == ["/bin/revived"]
    assert swallowed_by_comments(text) == [(3, "ExecStartPre=/bin/revived")]


@pytest.mark.parametrize(
    ("text", "swallowed"),
    [
        ("[S]\n# a \\ \nK=1\n", [(3, "K=1")]),  # go-systemd dropped one trailing space first
        ("[S]\n# a \\\n# b \\\nK=1\nL=2\n", [(4, "K=1")]),
        ("[S]\n# a \\\n\nK=1\n", []),
        ("[S]\n# a\nK=1 \\\nL=2\n", []),
        ("[S]\nK=1\n", []),
    ],
)
def test_lines_fleet_swallowed_into_a_comment_are_found(text: str, swallowed: list) -> None:
    assert swallowed_by_comments(text) == swallowed


@pytest.mark.parametrize(
    ("option", "fragment"),
    [
        # B2/B3 of the reliability issue: each would have become a line of its own
        ({"section": "Service", "name": "ExecStart", "value": "/bin/true\r[oops"}, "U+000D"),
        ({"section": "Service", "name": "ExecStart", "value": "/bin/sleep 1\rExecStartPre=/bin/x"}, "U+000D"),
        ({"section": "Service", "name": "X\x00ExecStartPre", "value": "/bin/x"}, "U+0000"),
        (
            {"section": "Service", "name": "ExecStart", "value": "/bin/sleep 1\nExecStartPre=/bin/x"},
            "line break",
        ),
        ({"section": "Serv\u2029ice", "name": "A", "value": "b"}, "U+2029"),
        ({"section": "Service", "name": "A", "value": "x\ud800"}, "U+D800"),
        # a trailing backslash would swallow the next option
        ({"section": "Service", "name": "ExecStart", "value": "/bin/foo \\"}, "ends in a backslash"),
        ({"section": "Service", "name": "ExecStart", "value": "/bin/foo \\\\\\"}, "ends in a backslash"),
        ({"section": "Service", "name": "ExecStart", "value": "/bin/foo \\\n# c"}, "ends in a backslash"),
        ({"section": "Service", "name": "#ExecStart", "value": "x"}, "begin a comment"),
    ],
)
def test_api_options_that_would_change_meaning_are_refused(option: dict, fragment: str) -> None:
    with pytest.raises(InvalidUnitFile) as err:
        UnitFile.from_options([option])
    assert "option 0" in str(err.value) and fragment in str(err.value)


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ("  padded\t", "padded"),  # systemd drops blanks around a value
        ("a\\\\", "a\\\\"),  # an escaped backslash does not continue the line
        ("/bin/a \\\n", "/bin/a"),  # go-systemd's form of a continuation before a blank line
        ("/bin/a \\\r\n b", "/bin/a   b"),
        ("a \\\n# c\n b", "a   b"),  # comment lines inside a continuation are skipped
        ("tab\tinside", "tab\tinside"),
    ],
)
def test_api_values_are_stored_as_systemd_reads_them(value: str, stored: str) -> None:
    unit = UnitFile.from_options([{"section": "Service", "name": "ExecStart", "value": value}])
    assert unit.values("Service", "ExecStart") == [stored]
    assert UnitFile.parse(unit.to_text()) == unit


def test_the_forbidden_character_search_is_exactly_the_unicode_categories_it_stands_for() -> None:
    # Cc, Zl, Zp and Cs lie in the Basic Multilingual Plane; a few characters past it stand for
    # the rest (checking all 1.1 million code points would cost the fast subset 2 s).
    for code in [*range(0x10000), 0x10000, 0x1F600, 0xE0001, 0x10FFFF]:
        char = chr(code)
        assert (syntax.first_forbidden(char) is not None) == syntax._forbidden(char), hex(code)
    assert syntax.first_forbidden("a\tb\x85c\x01", allowed="\x85") == "\x01"
