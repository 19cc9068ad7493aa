"""Quoting for unit files: what each writer puts in, systemd's reader gives back."""

from __future__ import annotations

import pytest

from fleetpy.unit import InvalidUnitFile
from fleetpy.unit.quoting import environment, escape_specifiers, quote_value, quote_word


def test_safe_words_stay_bare_and_others_are_quoted() -> None:
    assert quote_word("/usr/bin/podman") == "/usr/bin/podman"
    assert quote_word("a b") == '"a b"'
    assert quote_word('say "hi" \\ now') == '"say \\"hi\\" \\\\ now"'


def test_specifiers_and_variables_are_escaped_in_command_words() -> None:
    assert quote_word("100%n") == '"100%%n"'
    assert quote_word("$HOME") == '"$$HOME"'
    assert quote_word("$HOME", expand_dollar=False) == '"$HOME"'


def test_values_escape_specifiers_unless_asked_to_keep_them() -> None:
    assert quote_value("/opt/x%y") == '"/opt/x%%y"'
    assert quote_value("%H", specifiers=True) == '"%H"'
    assert environment("ETCD_NAME", "%H", specifiers=True) == 'Environment="ETCD_NAME=%H"'
    assert environment("A", 'x"y') == 'Environment="A=x\\"y"'
    assert escape_specifiers("50%") == "50%%"


@pytest.mark.parametrize("value", ["a\nExecStartPre=/bin/rm", "a\rb", "a\x00", "a\u2028b"])
def test_line_breaks_and_control_characters_are_refused(value: str) -> None:
    for write in (quote_word, quote_value, escape_specifiers):
        with pytest.raises(InvalidUnitFile, match="cannot be written into a unit file"):
            write(value)
