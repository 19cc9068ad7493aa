"""fleet's [X-Fleet] section: scheduling options, specifiers and their rules."""

from __future__ import annotations

import fnmatch
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

from fleetpy.unit.errors import InvalidFleetOptions, UnitError
from fleetpy.unit.file import UnitFile
from fleetpy.unit.name import UnitName, validate_unit_name

SECTION = "X-Fleet"
OPTIONS = (
    "MachineID",
    "MachineOf",
    "MachineMetadata",
    "Conflicts",
    "Global",
    "Replaces",
    # fleetpy's own: the agent stops the unit when it cannot renew its heartbeat, before its
    # TTL runs out and the engine moves the unit, so it never runs on two machines at once.
    "Fence",
)

# Names fleet accepted before v0.8.0; still honoured so old unit files keep working.
DEPRECATED = {
    "X-ConditionMachineID": "MachineID",
    "X-ConditionMachineOf": "MachineOf",
    "X-ConditionMachineMetadata": "MachineMetadata",
    "X-Conflicts": "Conflicts",
}
REMOVED = {
    "X-ConditionMachineBootID": (
        "X-ConditionMachineBootID is no longer supported because boot IDs change "
        "on every reboot; use MachineID with the full ID from "
        "'fleetctl list-machines -l'"
    ),
}

_TRUE = frozenset({"1", "yes", "y", "true", "t", "on"})
_FALSE = frozenset({"0", "no", "n", "false", "f", "off"})
_SPECIFIER = re.compile(r"%(.)", re.DOTALL)


@dataclass(frozen=True)
class FleetOptions:
    """The scheduling requirements a unit states in its [X-Fleet] section."""

    machine_id: str | None = None
    machine_of: tuple[str, ...] = ()
    # Different keys must all match; several values of one key are alternatives.
    machine_metadata: tuple[tuple[str, frozenset[str]], ...] = ()
    conflicts: tuple[str, ...] = ()
    is_global: bool = False
    replaces: tuple[str, ...] = ()
    fence: bool = False
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def metadata_matches(self, metadata: Mapping[str, str]) -> bool:
        return all(metadata.get(key) in allowed for key, allowed in self.machine_metadata)

    def conflicts_with(self, other_name: str) -> bool:
        """Whether one of this unit's Conflicts globs matches `other_name`."""
        return any(fnmatch.fnmatchcase(other_name, pattern) for pattern in self.conflicts)


def expand_specifiers(value: str, name: UnitName) -> str:
    """Expand %n %N %p %i and %% as systemd does.

    Other specifiers are left untouched, as fleet did, so values such as
    "discount=50%" in metadata survive.
    """
    table = {
        "n": name.full,
        "N": name.stem,
        "p": name.prefix,
        "i": name.instance or "",
        "%": "%",
    }
    return _SPECIFIER.sub(lambda m: table.get(m.group(1), m.group(0)), value)


def parse_fleet_options(unit_name: str, unit: UnitFile) -> FleetOptions:
    """Read `unit`'s [X-Fleet] section as it applies to the unit called `unit_name`."""
    name = validate_unit_name(unit_name)
    warnings: list[str] = []
    values: dict[str, list[str]] = {key: [] for key in OPTIONS}
    for option in unit.options:
        if option.section != SECTION:
            continue
        key = option.name
        if key in REMOVED:
            raise InvalidFleetOptions(f"{unit_name}: {REMOVED[key]}")
        if key in DEPRECATED:
            warnings.append(
                f"{unit_name}: [X-Fleet] {key} is deprecated since fleet v0.8.0; "
                f"use {DEPRECATED[key]} instead"
            )
            key = DEPRECATED[key]
        if key not in values:
            raise InvalidFleetOptions(
                f"{unit_name}: unknown [X-Fleet] option {key!r}; valid options are {', '.join(OPTIONS)}"
            )
        values[key].append(expand_specifiers(option.value, name))

    options = FleetOptions(
        machine_id=_machine_id(unit_name, values["MachineID"]),
        machine_of=_unit_names(unit_name, "MachineOf", values["MachineOf"]),
        machine_metadata=_metadata(unit_name, values["MachineMetadata"]),
        conflicts=_words(unit_name, "Conflicts", values["Conflicts"]),
        is_global=_boolean(unit_name, "Global", values["Global"]),
        replaces=_unit_names(unit_name, "Replaces", values["Replaces"]),
        fence=_boolean(unit_name, "Fence", values["Fence"]),
        warnings=tuple(warnings),
    )
    _check_combinations(unit_name, options)
    return options


def _check_combinations(unit_name: str, options: FleetOptions) -> None:
    if options.is_global:
        clashing = [
            key
            for key, present in (
                ("MachineID", options.machine_id is not None),
                ("MachineOf", bool(options.machine_of)),
                ("Replaces", bool(options.replaces)),
            )
            if present
        ]
        if clashing:
            raise InvalidFleetOptions(
                f"{unit_name}: Global=true cannot be combined with "
                f"{', '.join(clashing)}; a global unit runs on every machine "
                "matching its MachineMetadata, so remove one or the other"
            )
    if options.replaces and options.conflicts:
        raise InvalidFleetOptions(
            f"{unit_name}: Replaces cannot be combined with Conflicts; "
            "Replaces already keeps the replaced unit off the chosen machine"
        )


def _words(unit_name: str, key: str, values: list[str]) -> tuple[str, ...]:
    words: list[str] = []
    for value in values:
        split = value.split()
        if not split:
            raise InvalidFleetOptions(f"{unit_name}: {key}= is empty; give a value or drop the line")
        words.extend(split)
    return tuple(words)


def _unit_names(unit_name: str, key: str, values: list[str]) -> tuple[str, ...]:
    names = _words(unit_name, key, values)
    for other in names:
        try:
            validate_unit_name(other)
        except UnitError as err:
            raise InvalidFleetOptions(f"{unit_name}: {key}={other} is not a unit name: {err}") from err
    return names


def _machine_id(unit_name: str, values: list[str]) -> str | None:
    if not values:
        return None
    if len(values) > 1:
        raise InvalidFleetOptions(
            f"{unit_name}: MachineID is given {len(values)} times; a unit can be pinned to one machine only"
        )
    words = values[0].split()
    if len(words) != 1:
        raise InvalidFleetOptions(
            f"{unit_name}: MachineID must be exactly one machine ID, got {values[0]!r}; "
            "see 'fleetctl list-machines -l'"
        )
    return words[0]


def _boolean(unit_name: str, key: str, values: list[str]) -> bool:
    # As in systemd, the last assignment wins.
    if not values:
        return False
    value = values[-1].strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InvalidFleetOptions(f"{unit_name}: {key}={values[-1]!r} is not a boolean; use true or false")


def _metadata(unit_name: str, values: list[str]) -> tuple[tuple[str, frozenset[str]], ...]:
    allowed: dict[str, set[str]] = {}
    for value in values:
        try:
            pairs = shlex.split(value)
        except ValueError as err:
            raise InvalidFleetOptions(
                f"{unit_name}: MachineMetadata={value} cannot be read ({err}); "
                'check the quotes, e.g. MachineMetadata="region=us-east" "disk=ssd"'
            ) from err
        if not pairs:
            raise InvalidFleetOptions(
                f"{unit_name}: MachineMetadata= is empty; give key=value pairs or drop the line"
            )
        for pair in pairs:
            key, eq, wanted = pair.partition("=")
            key, wanted = key.strip(), wanted.strip()
            if not eq or not key or not wanted:
                raise InvalidFleetOptions(
                    f"{unit_name}: MachineMetadata entry {pair!r} is not a key=value "
                    'pair; write it as e.g. MachineMetadata="region=us-east"'
                )
            allowed.setdefault(key, set()).add(wanted)
    return tuple((key, frozenset(vals)) for key, vals in allowed.items())
