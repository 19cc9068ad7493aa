"""Writing values into unit files and drop-ins so that systemd reads back exactly what was meant.

The one home for quoting: container units, the lab's fleet.service drop-in and cloud-config's
Environment= drop-ins all write through these. Inside double quotes systemd treats only the
backslash and the quote itself specially; `%` starts a specifier everywhere and `$` an
environment variable in command lines.
"""

from __future__ import annotations

import re

from fleetpy.unit.errors import InvalidUnitFile
from fleetpy.unit.syntax import first_forbidden

# Words that systemd reads back unchanged without quotes.
_SAFE_WORD = re.compile(r"[A-Za-z0-9_./:=@,+-]+")


def _checked(value: str) -> str:
    bad = first_forbidden(value)
    if bad is not None:
        raise InvalidUnitFile(
            f"{value!r} holds U+{ord(bad):04X}: line breaks and control characters cannot be written into a unit file"
        )
    return value


def escape_specifiers(text: str) -> str:
    """`text` with every `%` doubled, so systemd expands no specifier in it."""
    return _checked(text).replace("%", "%%")


def quote_word(value: str, expand_dollar: bool = True) -> str:
    """One word of a command line (ExecStart=...), read back verbatim.

    `%` becomes `%%` and, unless `expand_dollar` is off (Environment= does not expand `$`),
    `$` becomes `$$`; a word outside a conservative safe set goes in double quotes.
    """
    escaped = escape_specifiers(value)
    if expand_dollar:
        escaped = escaped.replace("$", "$$")
    if _SAFE_WORD.fullmatch(escaped):
        return escaped
    return _double_quoted(escaped)


def quote_value(value: str, specifiers: bool = False) -> str:
    """`value` as one double-quoted word; with `specifiers`, `%H` and the like are left for
    systemd to expand (cloud-config writes `name: %H` on purpose)."""
    return _double_quoted(_checked(value) if specifiers else escape_specifiers(value))


def environment(name: str, value: str, specifiers: bool = False) -> str:
    """An `Environment="NAME=value"` line."""
    return f"Environment={quote_value(f'{name}={value}', specifiers)}"


def _double_quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
