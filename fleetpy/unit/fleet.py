"""fleet's [X-Fleet] section: scheduling options, specifiers and their rules.

Values are read as fleet read them (job/job.go and unit/unit.go of fleet v1.0): a value
that starts and ends with a double quote is a list of quoted words, quotes dropped;
otherwise its words are split at whitespace. %n %N %p %i expand from the unit's name.
Where fleet silently read a value as something its author cannot have meant (a Global it
read as false, a MachineMetadata entry it ignored, a malformed glob that matched nothing),
fleetpy refuses it and says how fleet read it. docs/fleet-compat.md lists every case.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

from fleetpy.conf.values import BadValue, parse_bytes, parse_cpus, parse_duration
from fleetpy.unit.errors import InvalidFleetOptions, UnitError
from fleetpy.unit.file import UnitFile
from fleetpy.unit.glob import BadPattern, check_pattern, glob_match
from fleetpy.unit.name import UnitName, validate_unit_name

Amount = TypeVar("Amount", int, float)

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
    # fleetpy's own (issue 13): resources a unit reserves on its machine, richer constraints on
    # machine facts and metadata than MachineMetadata's equality, and how to pick among machines.
    "MemoryRequest",
    "CPURequest",
    "MachineConstraint",
    "Strategy",
    # fleetpy's own health check (one of HTTP, TCP, Exec) and how the agent runs it.
    *(
        "HealthCheckHTTP",
        "HealthCheckTCP",
        "HealthCheckExec",
        "HealthCheckInterval",
        "HealthCheckTimeout",
        "HealthCheckThreshold",
        "HealthCheckStartPeriod",
        "HealthCheckAction",
        "HealthCheckMoveAfter",
    ),
    # fleetpy's own: volumes, NAME[:DRIVER], directories the agent makes and hands to the unit
    # as $FLEET_VOLUME_<NAME>. A local one stays on the machine that first made it (the unit
    # with it); a shared one is on storage every machine mounts, so it pins nothing.
    "Volume",
)
STRATEGIES = ("spread", "binpack")

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
    # What the unit reserves on its machine: bytes of memory and CPUs (0 when it asks nothing).
    memory_request: int = 0
    cpu_request: float = 0.0
    constraints: tuple[Constraint, ...] = ()
    strategy: str = "spread"
    health: HealthCheck | None = None
    volumes: tuple[str, ...] = ()  # local volumes (driver "local")
    shared_volumes: tuple[str, ...] = ()  # volumes on the shared volume directory
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def metadata_matches(self, metadata: Mapping[str, str]) -> bool:
        return all(metadata.get(key) in allowed for key, allowed in self.machine_metadata)

    def failed_constraint(self, attributes: Mapping[str, object]) -> Constraint | None:
        """The first constraint a machine with these facts and metadata breaks, if any."""
        return next((c for c in self.constraints if not c.holds(attributes.get(c.key))), None)

    @property
    def requests(self) -> bool:
        return bool(self.memory_request or self.cpu_request)

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
        memory_request=_memory_request(unit_name, values["MemoryRequest"], unit, warnings),
        cpu_request=_cpu_request(unit_name, values["CPURequest"], unit, warnings),
        constraints=tuple(
            _constraint(unit_name, word) for words in values["MachineConstraint"] for word in words
        ),
        strategy=_strategy(unit_name, values["Strategy"]),
        health=_health_check(unit_name, name, values),
        warnings=tuple(warnings),
        **_volumes(unit_name, name, values["Volume"]),
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
                ("Volume", bool(options.volumes or options.shared_volumes)),
                ("HealthCheckMoveAfter", bool(options.health and options.health.move_after)),
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


# --- volumes -------------------------------------------------------------------------------

# A volume name is one path component the agent can make under its volume directory, and a
# systemd unit-name-like word: no "/", never "." or "..", no blank, quote, "%" or "$".
_VOLUME_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
VOLUME_ENV_PREFIX = "FLEET_VOLUME_"
# Volume=NAME[:DRIVER]: local (the default) lives on one machine and keeps its units there;
# shared lives on storage every machine mounts (fleetd --shared-volume-dir), so it pins nothing.
LOCAL, SHARED = "local", "shared"
VOLUME_DRIVERS = (LOCAL, SHARED)


def check_volume_name(name: str) -> str:
    """`name` if it can name a volume, else InvalidFleetOptions saying why (the one rule)."""
    if not _VOLUME_NAME.fullmatch(name) or name in (".", "..") or ".." in name:
        raise InvalidFleetOptions(
            f"volume name {name!r} may hold only letters, digits and '_.-' (at most 128, "
            "never '..'), as in Volume=pgdata or Volume=data-%i"
        )
    return name


def volume_environment_name(name: str) -> str:
    """The variable a unit finds its volume's path in: FLEET_VOLUME_pg_data for pg-data."""
    return VOLUME_ENV_PREFIX + name.replace("-", "_").replace(".", "_")


def split_volume(word: str) -> tuple[str, str]:
    """One Volume= word, NAME[:DRIVER], as (name, driver); the driver is "local" when not given.

    The name is returned unchecked (a template's holds %i); InvalidFleetOptions for a driver
    that is not one of VOLUME_DRIVERS, saying what to write.
    """
    name, colon, driver = word.partition(":")
    if not colon:
        return name, LOCAL
    if driver not in VOLUME_DRIVERS:
        raise InvalidFleetOptions(
            f"unknown volume driver {driver!r}; write Volume={name} for a local volume (it stays on "
            f"the machine that made it) or Volume={name}:shared for one on the shared volume "
            "directory every machine mounts"
        )
    return name, driver


def _volumes(unit_name: str, name: UnitName, values: list[list[str]]) -> dict[str, tuple[str, ...]]:
    """The unit's volumes by driver, as FleetOptions' `volumes` and `shared_volumes`."""
    drivers: dict[str, str] = {}  # volume -> driver, in the order first given
    by_variable: dict[str, str] = {}
    if values and name.suffix != "service":
        raise InvalidFleetOptions(
            f"{unit_name}: Volume= is for services; it hands the path over in the service's environment"
        )
    for word in (word for words in values for word in words):
        try:
            volume, driver = split_volume(word)
            # A template's %i is checked as an instance would fill it; each instance is checked itself.
            check_volume_name(volume.replace(_PENDING_INSTANCE, "1") if name.is_template else volume)
        except InvalidFleetOptions as error:
            raise InvalidFleetOptions(f"{unit_name}: Volume={word}: {error}") from None
        if drivers.get(volume, driver) != driver:
            raise InvalidFleetOptions(
                f"{unit_name}: Volume={volume}:{drivers[volume]} and Volume={word} name one volume with "
                f"two drivers; keep one of them (a volume is either local or shared)"
            )
        variable = volume_environment_name(volume)
        if by_variable.get(variable, volume) != volume:
            raise InvalidFleetOptions(
                f"{unit_name}: Volume={by_variable[variable]} and Volume={volume} would both be "
                f"${variable}; rename one"
            )
        by_variable[variable] = volume
        drivers.setdefault(volume, driver)
    return {
        "volumes": tuple(v for v, d in drivers.items() if d == LOCAL),
        "shared_volumes": tuple(v for v, d in drivers.items() if d == SHARED),
    }


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


# --- resources -------------------------------------------------------------------------------


def _systemd_value(unit: UnitFile, names: tuple[str, ...]) -> tuple[str, str] | None:
    """The last [Service] assignment of any of `names` (systemd's rule), or None when unset
    or reset by an empty assignment."""
    found = None
    for option in unit.options:
        if option.section == "Service" and option.name in names:
            found = (option.name, option.value.strip())
    return found if found and found[1] else None


def _memory_request(unit_name: str, values: list[list[str]], unit: UnitFile, warnings: list[str]) -> int:
    """MemoryRequest= if given, else the unit's own MemoryMax= (or the older MemoryLimit=).

    systemd's value is only read: a limit it cannot parse is systemd's to report, and a
    percentage depends on the machine, so it reserves nothing.
    """
    size = _explicit_request(unit_name, "MemoryRequest", values, parse_bytes)
    if size is not None:
        return size
    limit = _systemd_value(unit, ("MemoryMax", "MemoryLimit"))
    if limit is None or limit[1] == "infinity":
        return 0
    try:
        return parse_bytes(limit[1])
    except BadValue:
        warnings.append(
            f"{unit_name}: {limit[0]}={limit[1]} reserves no memory for scheduling (only an absolute "
            "size does); add [X-Fleet] MemoryRequest= to reserve some"
        )
        return 0


def _explicit_request(
    unit_name: str, key: str, values: list[list[str]], parse: Callable[[str], Amount]
) -> Amount | None:
    """The [X-Fleet] request `key` parsed and more than 0, or None when the unit does not set it."""
    word = _last_word(unit_name, key, values)
    if word is None:
        return None
    try:
        amount = parse(word)
    except BadValue as error:
        raise InvalidFleetOptions(f"{unit_name}: {key}={word}: {error}") from None
    if amount <= 0:
        raise InvalidFleetOptions(f"{unit_name}: {key}={word} must be more than 0")
    return amount


def _cpu_request(unit_name: str, values: list[list[str]], unit: UnitFile, warnings: list[str]) -> float:
    """CPURequest= if given (1.5 or 150%), else the unit's own CPUQuota=."""
    cpus = _explicit_request(unit_name, "CPURequest", values, parse_cpus)
    if cpus is not None:
        return cpus
    quota = _systemd_value(unit, ("CPUQuota",))
    if quota is None:
        return 0.0
    if not quota[1].endswith("%"):
        warnings.append(f"{unit_name}: CPUQuota={quota[1]} is not a percentage; it reserves no CPU")
        return 0.0
    try:
        return parse_cpus(quota[1])
    except BadValue:
        warnings.append(f"{unit_name}: CPUQuota={quota[1]} is not a percentage; it reserves no CPU")
        return 0.0


def _strategy(unit_name: str, values: list[list[str]]) -> str:
    word = _last_word(unit_name, "Strategy", values)
    if word is None:
        return "spread"
    if word not in STRATEGIES:
        raise InvalidFleetOptions(
            f"{unit_name}: Strategy={word} is unknown; use spread (the least loaded machine, as "
            "fleet does) or binpack (the fullest machine the unit fits on)"
        )
    return word


# --- constraints -----------------------------------------------------------------------------

_CONSTRAINT = re.compile(r"([A-Za-z0-9_.:/-]+)(==|!=|<=|>=|<|>)(.+)")
_ORDERED = ("<", "<=", ">", ">=")
# A version: numbers joined by dots, with anything after (6.1.0-13-amd64 is 6.1.0).
_VERSION = re.compile(r"(\d+(?:\.\d+)*)(?:[-+~_].*)?")


@dataclass(frozen=True)
class Constraint:
    """One MachineConstraint word: KEY OP VALUE on a machine's facts and metadata.

    `==` and `!=` compare text, `/regex/` as the value matches a regular expression (as in
    Swarm's constraints) and `{a,b}` is a set; `<`, `<=`, `>`, `>=` compare numbers (sizes such
    as 8G too) or versions (5.10). A machine without the key passes only `!=`.
    """

    key: str
    op: str
    value: str

    def __str__(self) -> str:
        return f"{self.key}{self.op}{self.value}"

    def holds(self, actual: object) -> bool:
        if actual is None:
            return self.op == "!="
        text = _text(actual)
        if self.op in ("==", "!="):
            return self._equal(text) == (self.op == "==")
        order = _compare(text, self.value)
        if order is None:
            return False
        return {"<": order < 0, "<=": order <= 0, ">": order > 0, ">=": order >= 0}[self.op]

    def _equal(self, text: str) -> bool:
        if len(self.value) >= 2 and self.value.startswith("/") and self.value.endswith("/"):
            return _regex(self.value[1:-1]).search(text) is not None
        if self.value.startswith("{") and self.value.endswith("}"):
            return text in _members(self.value)
        return text == self.value


def _text(value: object) -> str:
    # Facts arrive from JSON: 2.0 CPUs compare equal to "2".
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _members(value: str) -> frozenset[str]:
    return frozenset(v.strip() for v in value[1:-1].split(",") if v.strip())


_REGEX_CACHE: dict[str, re.Pattern[str]] = {}


def _regex(pattern: str) -> re.Pattern[str]:
    if pattern not in _REGEX_CACHE:
        _REGEX_CACHE[pattern] = re.compile(pattern)
    return _REGEX_CACHE[pattern]


def _number(text: str) -> float | None:
    try:
        return float(parse_bytes(text)) if text[-1:].isalpha() else float(text)
    except (BadValue, ValueError):
        return None


def _compare(actual: str, wanted: str) -> int | None:
    """-1, 0 or 1 as `actual` is below, at or above `wanted`; None when they do not compare."""
    a, b = _number(actual), _number(wanted)
    if a is not None and b is not None:
        return (a > b) - (a < b)
    va, vb = _VERSION.fullmatch(actual), _VERSION.fullmatch(wanted)
    if va is None or vb is None:
        return None
    ta, tb = (tuple(int(p) for p in m.group(1).split(".")) for m in (va, vb))
    return (ta > tb) - (ta < tb)


def parse_constraint(word: str) -> Constraint:
    """One MachineConstraint word, as a unit states it (InvalidFleetOptions if it cannot be read)."""
    return _constraint("MachineConstraint", word)


def _constraint(unit_name: str, word: str) -> Constraint:
    """Parse and check one MachineConstraint word: the one reader of the syntax."""
    match = _CONSTRAINT.fullmatch(word)
    if match is None:
        raise InvalidFleetOptions(
            f"{unit_name}: MachineConstraint {word!r} is not KEY OP VALUE; write e.g. "
            '"load1<2" "kernel>=5.10" "zone!=a" "zone=={a,b}" "os==/^linux$/" (OP is one of '
            "== != < <= > >=)"
        )
    key, op, value = match.groups()
    constraint = Constraint(key, op, value)
    if op in _ORDERED:
        if _number(value) is None and _VERSION.fullmatch(value) is None:
            raise InvalidFleetOptions(
                f"{unit_name}: MachineConstraint {word!r}: {op} compares numbers (2, 0.5, 8G) or "
                "versions (5.10); use == or != for text"
            )
    elif value.startswith("/") and value.endswith("/") and len(value) >= 2:
        try:
            _regex(value[1:-1])
        except re.error as error:
            raise InvalidFleetOptions(
                f"{unit_name}: MachineConstraint {word!r}: bad regular expression: {error}"
            ) from None
    elif value.startswith("{") and (not value.endswith("}") or not _members(value)):
        raise InvalidFleetOptions(
            f"{unit_name}: MachineConstraint {word!r}: a set is written {{a,b,c}} with at least one member"
        )
    return constraint


# Health checks. Defaults and names follow Docker's HEALTHCHECK and Kubernetes' probes: every
# 10s, 2s to answer, unhealthy after 3 failures in a row, no grace period unless asked for.
HEALTH_KINDS = {"HealthCheckHTTP": "http", "HealthCheckTCP": "tcp", "HealthCheckExec": "exec"}
HEALTH_ACTIONS = ("restart", "none")
MIN_HEALTH_INTERVAL = 1.0
MAX_HEALTH_THRESHOLD = 100
MAX_HEALTH_MOVE_AFTER = 100


@dataclass(frozen=True)
class HealthCheck:
    """How the agent checks that a running unit works, and what it does when it does not.

    The check reaches only the machine itself: HTTP and TCP go to a loopback address, Exec
    runs an absolute program with its arguments as they are (no shell).
    """

    kind: str  # "http", "tcp" or "exec"
    host: str = ""
    port: int = 0
    path: str = "/"
    argv: tuple[str, ...] = ()
    interval: float = 10.0
    timeout: float = 2.0
    threshold: int = 3  # consecutive failures that make the unit unhealthy
    start_period: float = 0.0  # after each start, failures do not count (a success still does)
    restart: bool = True  # restart an unhealthy unit; False only marks it unhealthy
    # After this many restarts on one machine, the next time it turns unhealthy the unit is not
    # restarted there again: the engine moves it to another machine (0: never moved).
    move_after: int = 0

    def exhausted(self, restarts: int) -> bool:
        """Whether `restarts` restarts on one machine are all this check allows there."""
        return bool(self.move_after) and restarts >= self.move_after

    def target(self) -> str:
        """What is checked, for people: "GET http://127.0.0.1:8080/health"."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.kind == "http":
            return f"GET http://{host}:{self.port}{self.path}"
        if self.kind == "tcp":
            return f"TCP {host}:{self.port}"
        return "exec " + " ".join(self.argv)


def _health_check(unit_name: str, name: UnitName, values: dict[str, list[list[str]]]) -> HealthCheck | None:
    given = [key for key in HEALTH_KINDS if values[key]]
    tuning = [
        key for key in values if key.startswith("HealthCheck") and key not in HEALTH_KINDS and values[key]
    ]
    if not given:
        if tuning:
            raise InvalidFleetOptions(
                f"{unit_name}: {', '.join(tuning)} without a check; add HealthCheckHTTP=, "
                "HealthCheckTCP= or HealthCheckExec="
            )
        return None
    if len(given) > 1:
        raise InvalidFleetOptions(
            f"{unit_name}: {' and '.join(given)} both given; a unit has one health check"
        )
    key = given[0]
    words = values[key][-1]  # the last assignment wins, as in systemd
    if name.is_template and any(_PENDING_INSTANCE in word for word in words):
        words = [word.replace(_PENDING_INSTANCE, "1") for word in words]  # each instance is checked
    where = _health_target(unit_name, key, words)
    interval = _health_duration(unit_name, "HealthCheckInterval", values, 10.0)
    timeout = _health_duration(unit_name, "HealthCheckTimeout", values, min(2.0, interval))
    if interval < MIN_HEALTH_INTERVAL:
        raise InvalidFleetOptions(
            f"{unit_name}: HealthCheckInterval must be at least {MIN_HEALTH_INTERVAL:g}s"
        )
    if not 0 < timeout <= interval:
        raise InvalidFleetOptions(
            f"{unit_name}: HealthCheckTimeout must be more than 0 and at most HealthCheckInterval "
            f"({interval:g}s), so one check ends before the next begins"
        )
    action = _last_health_word(unit_name, "HealthCheckAction", values) or "restart"
    if action not in HEALTH_ACTIONS:
        raise InvalidFleetOptions(
            f"{unit_name}: HealthCheckAction={action!r}; use restart (the default) or none "
            "(only mark the unit unhealthy)"
        )
    move_after = _health_move_after(unit_name, values)
    if move_after and action != "restart":
        raise InvalidFleetOptions(
            f"{unit_name}: HealthCheckMoveAfter= counts the restarts of HealthCheckAction=restart; "
            "drop HealthCheckAction=none, or drop HealthCheckMoveAfter="
        )
    return HealthCheck(
        kind=HEALTH_KINDS[key],
        **where,
        interval=interval,
        timeout=timeout,
        threshold=_health_threshold(unit_name, values),
        start_period=_health_duration(unit_name, "HealthCheckStartPeriod", values, 0.0),
        restart=action == "restart",
        move_after=move_after,
    )


def _health_target(unit_name: str, key: str, words: list[str]) -> dict:
    if key == "HealthCheckExec":
        if not words[0].startswith("/"):
            raise InvalidFleetOptions(
                f"{unit_name}: HealthCheckExec={words[0]} must start with an absolute path to a "
                "program; it runs with its arguments as given, not through a shell"
            )
        return {"argv": tuple(words)}
    if len(words) != 1:
        raise InvalidFleetOptions(f"{unit_name}: {key}={' '.join(words)!r} must be one address")
    if key == "HealthCheckTCP":
        text = words[0] if ":" in words[0] else f"127.0.0.1:{words[0]}"
        host, port = _host_port(unit_name, key, f"tcp://{text}", "", shown=words[0])
        return {"host": host, "port": port}
    url = words[0]
    if not url.startswith("http://"):
        raise InvalidFleetOptions(
            f"{unit_name}: {key}={url}: give an http:// URL on this machine, such as "
            "http://127.0.0.1:8080/health"
        )
    host, port = _host_port(unit_name, key, url, "80")
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if parts.fragment or any(ord(c) <= 32 or ord(c) == 127 for c in path):
        raise InvalidFleetOptions(f"{unit_name}: {key}={url}: the path has a fragment or a blank")
    return {"host": host, "port": port, "path": path}


def _host_port(unit_name: str, key: str, url: str, default_port: str, shown: str = "") -> tuple[str, int]:
    """A loopback host and port: a check reaches only its own machine."""
    shown = shown or url
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError as error:
        raise InvalidFleetOptions(f"{unit_name}: {key}={shown}: {error}") from None
    if parts.username is not None or parts.password is not None:
        raise InvalidFleetOptions(f"{unit_name}: {key}={shown}: no user or password in a check's address")
    if port is None:
        if not default_port:
            raise InvalidFleetOptions(f"{unit_name}: {key}={shown}: give a port, such as 127.0.0.1:5432")
        port = int(default_port)
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback or not 0 < port < 65536:
        raise InvalidFleetOptions(
            f"{unit_name}: {key}={shown}: a health check reaches only its own machine; use a loopback "
            "address (127.0.0.1, ::1 or localhost) and a port from 1 to 65535"
        )
    return host, port


def _last_health_word(unit_name: str, key: str, values: dict[str, list[list[str]]]) -> str | None:
    if not values[key]:
        return None
    words = values[key][-1]
    if len(words) != 1:
        raise InvalidFleetOptions(f"{unit_name}: {key}={' '.join(words)!r} must be one word")
    return words[0]


def _health_duration(unit_name: str, key: str, values: dict[str, list[list[str]]], default: float) -> float:
    word = _last_health_word(unit_name, key, values)
    if word is None:
        return default
    try:
        return parse_duration(word)
    except BadValue as error:
        raise InvalidFleetOptions(f"{unit_name}: {key}: {error}") from None


def _health_threshold(unit_name: str, values: dict[str, list[list[str]]]) -> int:
    word = _last_health_word(unit_name, "HealthCheckThreshold", values)
    if word is None:
        return 3
    if not word.isdigit() or not 1 <= int(word) <= MAX_HEALTH_THRESHOLD:
        raise InvalidFleetOptions(
            f"{unit_name}: HealthCheckThreshold={word!r}: give the number of failures in a row "
            f"that make the unit unhealthy, 1 to {MAX_HEALTH_THRESHOLD}"
        )
    return int(word)


def _health_move_after(unit_name: str, values: dict[str, list[list[str]]]) -> int:
    word = _last_health_word(unit_name, "HealthCheckMoveAfter", values)
    if word is None:
        return 0
    if not word.isdigit() or int(word) > MAX_HEALTH_MOVE_AFTER:
        raise InvalidFleetOptions(
            f"{unit_name}: HealthCheckMoveAfter={word!r}: give how many restarts for failed health "
            f"checks on one machine before the unit moves to another, 1 to {MAX_HEALTH_MOVE_AFTER} "
            "(0 never moves it)"
        )
    return int(word)
