"""Unit names as systemd's unit_name_is_valid reads them: the one validator every layer uses.

systemd (src/basic/unit-name.c) takes everything before the last "." as the name and what
follows as the unit type; the name may hold letters, digits, ":-_." and backslash (so
systemd-escape's "foo\\x2dbar.service" is a name), and "@" anywhere but first: the first "@"
ends the prefix and the rest up to the type is the instance ("a@b@c.service" is instance
"b@c" of "a@.service"). Only five unit types can be templates, as systemd loads them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from fleetpy.unit.errors import InvalidUnitName

# The unit types of current systemd (unit_type_from_string).
SUFFIXES = frozenset(
    {
        "automount",
        "device",
        "mount",
        "path",
        "scope",
        "service",
        "slice",
        "socket",
        "swap",
        "target",
        "timer",
    }
)
# fleet still listed these; systemd dropped them, and refuses names with them.
REMOVED_SUFFIXES = frozenset({"busname", "snapshot"})
# unit_type_may_template: only these load from a template.
TEMPLATE_SUFFIXES = frozenset({"path", "service", "socket", "target", "timer"})

# systemd's UNIT_NAME_MAX is 256 including the terminating NUL.
MAX_NAME_BYTES = 255

_ALLOWED = re.compile(r"[a-zA-Z0-9:_.@\\-]*")
ALLOWED_CHARS = 'letters, digits, ":_.@-" and "\\" (as in systemd-escape\'s "\\x2d")'


def _fail(name: str, why: str) -> InvalidUnitName:
    return InvalidUnitName(f'"{name}": {why}')


@dataclass(frozen=True)
class UnitName:
    """A validated unit name split into prefix, optional instance and type suffix."""

    full: str
    prefix: str
    # None for a plain unit, "" for a template ("foo@.service"), else the instance.
    instance: str | None
    suffix: str

    @classmethod
    def parse(cls, name: str) -> UnitName:
        if not isinstance(name, str):
            raise InvalidUnitName(f"unit name must be a string, not {type(name).__name__}")
        if not name:
            raise InvalidUnitName("unit name is empty; give a name such as hello.service")
        # surrogatepass: a lone surrogate (JSON's "\ud800") is counted, then refused as a
        # character below, instead of failing the encoding with an error nobody catches.
        size = len(name.encode("utf-8", "surrogatepass"))
        if size > MAX_NAME_BYTES:
            raise _fail(
                name[:40] + "...",
                f"unit names may be at most {MAX_NAME_BYTES} bytes long (this one is {size}); choose a shorter name",
            )
        if not _ALLOWED.fullmatch(name):
            bad = next(ch for ch in name if not _ALLOWED.fullmatch(ch))
            raise _fail(name, f"unit names may contain only {ALLOWED_CHARS} (found {bad!r}); rename the unit")
        stem, dot, suffix = name.rpartition(".")
        if dot and suffix in REMOVED_SUFFIXES:
            raise _fail(name, f'current systemd has no ".{suffix}" units (fleet still listed them)')
        if not dot or suffix not in SUFFIXES:
            kinds = ", ".join(sorted(SUFFIXES))
            unknown = f'; ".{suffix}" is not a unit type' if dot else ""
            raise _fail(
                name,
                f"missing a unit type suffix such as .service (one of {kinds}){unknown}",
            )
        prefix, at, instance = stem.partition("@")
        if not prefix:
            raise _fail(
                name,
                "nothing before the "
                + ('"@"' if at else f'".{suffix}"')
                + "; the unit needs a name such as hello."
                + suffix,
            )
        if at and suffix not in TEMPLATE_SUFFIXES:
            kinds = ", ".join(sorted(TEMPLATE_SUFFIXES))
            raise _fail(
                name,
                f"only units of type {kinds} can be templates or instances; "
                f'remove the "@" or change the type',
            )
        return cls(full=name, prefix=prefix, instance=instance if at else None, suffix=suffix)

    @property
    def is_template(self) -> bool:
        return self.instance == ""

    @property
    def is_instance(self) -> bool:
        return bool(self.instance)

    @property
    def template(self) -> str | None:
        """The template an instance is made from ("foo@.service" for "foo@1.service")."""
        if not self.is_instance:
            return None
        return f"{self.prefix}@.{self.suffix}"

    @property
    def stem(self) -> str:
        """The full name without its type suffix, i.e. systemd's %N."""
        return self.full[: -len(self.suffix) - 1]

    def __str__(self) -> str:
        return self.full


def validate_unit_name(name: str) -> UnitName:
    """Parse `name`, raising InvalidUnitName with a readable reason if it is not usable."""
    return UnitName.parse(name)


def mangle_unit_name(arg: str) -> str:
    """A fleetctl argument as the unit it names, as fleet mangles it: a path's base name, with
    ".service" added when it has no unit type."""
    base = os.path.basename(arg)
    _, dot, suffix = base.rpartition(".")
    return base if dot and suffix in SUFFIXES else f"{base}.service"


def is_unit_name(name: str) -> bool:
    """Whether `name` is a valid unit name (for sorting files from other things in a directory)."""
    try:
        UnitName.parse(name)
    except InvalidUnitName:
        return False
    return True
