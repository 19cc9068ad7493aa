"""Unit files, unit names and fleet's [X-Fleet] options."""

from fleetpy.unit.errors import (
    InvalidFleetOptions,
    InvalidUnitFile,
    InvalidUnitName,
    UnitError,
)
from fleetpy.unit.file import UnitFile, UnitOption
from fleetpy.unit.fleet import FleetOptions, expand_specifiers, parse_fleet_options
from fleetpy.unit.name import SUFFIXES, TEMPLATE_SUFFIXES, UnitName, validate_unit_name
from fleetpy.unit.unit import Unit, load_unit

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
    "parse_fleet_options",
    "validate_unit_name",
]
