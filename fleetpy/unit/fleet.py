"""fleet's [X-Fleet] section: scheduling options, specifiers and their rules.

Values are read as fleet read them (job/job.go and unit/unit.go of fleet v1.0): a value
that starts and ends with a double quote is a list of quoted words, quotes dropped;
otherwise its words are split at whitespace. %n %N %p %i expand from the unit's name.
Where fleet silently read a value as something its author cannot have meant (a Global it
read as false, a MachineMetadata entry it ignored, a malformed glob that matched nothing),
fleetpy refuses it and says how fleet read it. docs/fleet-compat.md lists every case.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from fleetpy.unit.errors import InvalidFleetOptions, UnitError
from fleetpy.unit.file import UnitFile
from fleetpy.unit.glob import BadPattern, check_pattern, glob_match
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

# fleet v0.13+ (isTruthyValue): these, in any case, are true; anything else is false.
_FLEET_TRUE = frozenset({"true", "yes", "1", "on", "t"})
# False to fleet and to systemd alike.
_FALSE = frozenset({"false", "no", "0", "off", "f", "n"})
# systemd's parse_boolean, for fleetpy's own options.
_SYSTEMD_TRUE = frozenset({"true", "yes", "1", "on", "t", "y"})
# fleet's unitPrintf: only these four, replaced in this order; "%%" is left alone.
_SPECIFIERS = ("%n", "%N", "%p", "%i")
_PENDING_INSTANCE = "%i"
# A systemd-escape sequence such as \x2d, which path.Match reads as "x2d".
_ESCAPE_IN_PATTERN = re.compile(r"(?<!\\)\\x[0-9a-fA-F]{2}")


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
        return any(glob_match(pattern, other_name) for pattern in self.conflicts)

    def replaces_unit(self, other_name: str) -> bool:
        """Whether one of this unit's Replaces globs matches `other_name`."""
        return any(glob_match(pattern, other_name) for pattern in self.replaces)


def expand_specifiers(value: str, name: UnitName) -> str:
    """Expand %n %N %p %i as fleet did; a template's %i is left for its instances.

    Other specifiers, "%%" among them, are left untouched as fleet left them, so values
    such as "discount=50%" in metadata survive.
    """
    table = {"%n": name.full, "%N": name.stem, "%p": name.prefix, "%i": name.instance}
    for specifier in _SPECIFIERS:
        replacement = table[specifier]
        if specifier == "%i" and name.is_template:
            continue
        value = value.replace(specifier, replacement or "")
    return value


def split_words(value: str) -> list[str]:
    """fleet's reading of an [X-Fleet] value as a list of words.

    A value that starts and ends with '"' is quoted words: quotes go, blanks outside them
    split (fleet's parseMultivalueLine). Any other value splits at whitespace; a quote in
    it would have been kept by fleet as part of a word, which is never what was meant.
    """
    if len(value) >= 2 and value.startswith('"') and value.endswith('"'):
        if value.count('"') % 2:
            raise ValueError("its quotes are unbalanced")
        words, current, quoted = [], [], False
        for char in value:
            if char == '"':
                quoted = not quoted
            elif char in " \t" and not quoted:
                words.append("".join(current))
                current = []
            else:
                current.append(char)
        words.append("".join(current))
        return [word for word in words if word]
    if '"' in value:
        raise ValueError(
            "fleet reads quotes only around whole words of a value that starts and ends "
            'with one, as in "region=us-east" "disk=ssd"; here it would keep them as part of the text'
        )
    return value.split()


def parse_fleet_options(unit_name: str, unit: UnitFile) -> FleetOptions:
    """Read `unit`'s [X-Fleet] section as it applies to the unit called `unit_name`.

    A template's %i stays as it is: what depends on it is checked for each instance.
    """
    name = validate_unit_name(unit_name)
    warnings: list[str] = []
    values: dict[str, list[list[str]]] = {key: [] for key in OPTIONS}
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
        expanded = expand_specifiers(option.value, name)
        try:
            words = split_words(expanded)
        except ValueError as err:
            raise InvalidFleetOptions(f"{unit_name}: {key}={option.value} cannot be read: {err}") from None
        if not words:
            raise InvalidFleetOptions(f"{unit_name}: {key}= is empty; give a value or drop the line")
        if key == "MachineMetadata" and len(words) > 1 and not expanded.startswith('"'):
            warnings.append(
                f"{unit_name}: MachineMetadata={option.value}: fleet read this as one entry and "
                f"ignored it; fleetpy requires all {len(words)} pairs. Quote each pair "
                '("a=b" "c=d") or give one per line'
            )
        values[key].append(words)

    options = FleetOptions(
        machine_id=_machine_id(unit_name, values["MachineID"]),
        machine_of=_unit_names(unit_name, "MachineOf", values["MachineOf"]),
        machine_metadata=_metadata(unit_name, values["MachineMetadata"]),
        conflicts=_patterns(unit_name, "Conflicts", values["Conflicts"], warnings),
        is_global=_global(unit_name, values["Global"]),
        replaces=_patterns(unit_name, "Replaces", values["Replaces"], warnings),
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


def _names_like(values: list[list[str]]) -> tuple[str, ...]:
    # fleet split Conflicts at all whitespace, quoted or not; no unit name holds a blank.
    return tuple(part for words in values for word in words for part in word.split())


def _unit_names(unit_name: str, key: str, values: list[list[str]]) -> tuple[str, ...]:
    names = _names_like(values)
    for other in names:
        if _PENDING_INSTANCE in other:
            continue  # a template's: checked for each instance
        try:
            validate_unit_name(other)
        except UnitError as err:
            raise InvalidFleetOptions(f"{unit_name}: {key}={other} is not a unit name: {err}") from err
    return names


def _patterns(unit_name: str, key: str, values: list[list[str]], warnings: list[str]) -> tuple[str, ...]:
    patterns = _names_like(values)
    for pattern in patterns:
        try:
            check_pattern(pattern)
        except BadPattern as err:
            raise InvalidFleetOptions(
                f"{unit_name}: {key}={pattern} is not a glob fleet could match ({err}); fleet matched nothing"
            ) from None
        if _ESCAPE_IN_PATTERN.search(pattern):
            warnings.append(
                f"{unit_name}: {key}={pattern}: in a glob a backslash escapes the next character, "
                "so \\x2d matches 'x2d'; write \\\\x2d to match a systemd-escaped name"
            )
    return patterns


def _machine_id(unit_name: str, values: list[list[str]]) -> str | None:
    if not values:
        return None
    if len(values) > 1:
        raise InvalidFleetOptions(
            f"{unit_name}: MachineID is given {len(values)} times; a unit can be pinned to one machine only"
        )
    words = _names_like(values)
    if len(words) != 1:
        raise InvalidFleetOptions(
            f"{unit_name}: MachineID must be exactly one machine ID, got {' '.join(words)!r}; "
            "see 'fleetctl list-machines -l'"
        )
    return words[0]


def _last_word(unit_name: str, key: str, values: list[list[str]]) -> str | None:
    # As in fleet (and systemd), the last assignment wins.
    if not values:
        return None
    words = values[-1]
    if len(words) != 1:
        raise InvalidFleetOptions(f"{unit_name}: {key}={' '.join(words)!r} must be one word, true or false")
    return words[0]


def _global(unit_name: str, values: list[list[str]]) -> bool:
    """Global= as fleet v1.0 read it; refused where fleet's reading cannot have been meant."""
    word = _last_word(unit_name, "Global", values)
    if word is None:
        return False
    if word.lower() in _FLEET_TRUE:
        return True
    if word.lower() in _FALSE:
        return False
    if word.lower() == "y":
        raise InvalidFleetOptions(
            f"{unit_name}: Global={word} is ambiguous: fleet read it as false and systemd's "
            "booleans read it as true; write Global=true or Global=false"
        )
    raise InvalidFleetOptions(
        f"{unit_name}: Global={word!r} is not a boolean; fleet read it as false (only true, "
        "yes, 1, on and t, in any case, were true to it). Write Global=true or Global=false"
    )


def _boolean(unit_name: str, key: str, values: list[list[str]]) -> bool:
    """One of fleetpy's own boolean options, with systemd's spellings."""
    word = _last_word(unit_name, key, values)
    if word is None:
        return False
    if word.lower() in _SYSTEMD_TRUE:
        return True
    if word.lower() in _FALSE:
        return False
    raise InvalidFleetOptions(f"{unit_name}: {key}={word!r} is not a boolean; use true or false")


def _metadata(unit_name: str, values: list[list[str]]) -> tuple[tuple[str, frozenset[str]], ...]:
    allowed: dict[str, set[str]] = {}
    for words in values:
        for pair in words:
            # fleet's rule: exactly one "=", with text on both sides; it ignored anything else.
            key, eq, wanted = pair.partition("=")
            if not eq or not key or not wanted or "=" in wanted:
                raise InvalidFleetOptions(
                    f"{unit_name}: MachineMetadata entry {pair!r} is not a key=value pair, so fleet "
                    "ignored it and the unit could run on any machine; write it as e.g. "
                    'MachineMetadata="region=us-east"'
                )
            allowed.setdefault(key, set()).add(wanted)
    return tuple((key, frozenset(vals)) for key, vals in allowed.items())
