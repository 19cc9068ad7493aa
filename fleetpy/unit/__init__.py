"""Unit files, unit names and fleet's [X-Fleet] options.

Names load on first use (PEP 562): a short process such as fleetctl imports this package to
catch `UnitError` without paying for the parsers of a command that never parses a unit.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleetpy.unit.errors import InvalidFleetOptions, InvalidUnitFile, InvalidUnitName, UnitError
    from fleetpy.unit.file import UnitFile, UnitOption
    from fleetpy.unit.fleet import FleetOptions, expand_specifiers, parse_fleet_options
    from fleetpy.unit.name import SUFFIXES, TEMPLATE_SUFFIXES, UnitName, mangle_unit_name, validate_unit_name
    from fleetpy.unit.unit import Unit, load_unit

_HOMES = {
    "InvalidFleetOptions": "errors",
    "InvalidUnitFile": "errors",
    "InvalidUnitName": "errors",
    "UnitError": "errors",
    "UnitFile": "file",
    "UnitOption": "file",
    "FleetOptions": "fleet",
    "expand_specifiers": "fleet",
    "parse_fleet_options": "fleet",
    "SUFFIXES": "name",
    "TEMPLATE_SUFFIXES": "name",
    "UnitName": "name",
    "mangle_unit_name": "name",
    "validate_unit_name": "name",
    "Unit": "unit",
    "load_unit": "unit",
}

__all__ = [
    "SUFFIXES",
    "TEMPLATE_SUFFIXES",
    "FleetOptions",
    "InvalidFleetOptions",
    "InvalidUnitFile",
    "InvalidUnitName",
    "Unit",
    "UnitError",
    "UnitFile",
    "UnitName",
    "UnitOption",
    "expand_specifiers",
    "load_unit",
    "mangle_unit_name",
    "parse_fleet_options",
    "validate_unit_name",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
