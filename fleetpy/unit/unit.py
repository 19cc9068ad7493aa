"""A named unit: its validated name, its file and its fleet options together."""

from __future__ import annotations

from dataclasses import dataclass

from fleetpy.unit.file import UnitFile
from fleetpy.unit.fleet import FleetOptions, parse_fleet_options
from fleetpy.unit.name import UnitName, validate_unit_name


@dataclass(frozen=True)
class Unit:
    """A unit as fleet schedules it."""

    name: UnitName
    file: UnitFile
    fleet: FleetOptions

    @property
    def hash(self) -> str:
        return self.file.hash


def load_unit(name: str, text_or_file: str | UnitFile) -> Unit:
    """Validate `name`, parse the file if given as text, and read its [X-Fleet] section.

    A template's own [X-Fleet] section is read with an empty instance; each
    instance is read again under its own name when it is loaded.
    """
    unit_name = validate_unit_name(name)
    unit_file = UnitFile.parse(text_or_file) if isinstance(text_or_file, str) else text_or_file
    return Unit(unit_name, unit_file, parse_fleet_options(unit_name.full, unit_file))
