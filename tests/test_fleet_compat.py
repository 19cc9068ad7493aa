"""fleet and systemd compatibility, one row per behaviour, each naming the rule it follows.

Rules are cited as "fleet: <file or doc>" (fleet v1.0, github.com/coreos/fleet) and
"systemd: <function or man page>" (checked against systemd 252 where marked "measured").
docs/fleet-compat.md explains every row where fleetpy is stricter than fleet.
"""

from __future__ import annotations

import pytest

from fleetpy.engine.scheduler import plan
from fleetpy.registry.models import Assignment, Job, Machine
from fleetpy.unit import (
    InvalidFleetOptions,
    InvalidUnitFile,
    InvalidUnitName,
    UnitFile,
    UnitName,
    load_unit,
    parse_fleet_options,
)
from fleetpy.unit.glob import BadPattern, glob_match
from fleetpy.unit.syntax import swallowed_by_comments

SERVICE = "[Service]\nExecStart=/bin/true\n"


def refused(fragment: str) -> tuple[str, str]:
    return ("refused", fragment)


# --- unit file text: (rule, text, value of [S] K, or refused(fragment)) ----------------------
TEXT = [
    ("systemd: read_line ends a line at LF (measured)", "[S]\nK=a\nL=b\n", "a"),
    ("systemd+fleet: CRLF is one line end (measured; go-systemd trims the CR)", "[S]\r\nK=a\r\n", "a"),
    (
        "systemd ends a line at a lone CR, fleet does not: refused (measured)",
        "[S]\nK=a\rExecStartPre=/bin/evil\n",
        refused("U+000D"),
    ),
    (
        "systemd ends a line at NUL, fleet does not: refused (measured)",
        "[S]\nK=a\x00L=b\n",
        refused("U+0000"),
    ),
    (
        "systemd: NEL, VT, FF, U+2028 are not line ends; refused as invisible breaks",
        "[S]\nK=a\x85ExecStartPre=/bin/evil\n",
        refused("U+0085"),
    ),
    (
        "systemd.syntax: a trailing backslash continues the line, replaced by a space",
        "[S]\nK=a\\\nb\n",
        "a b",
    ),
    (
        "systemd config_parse: the next line is appended as is, inner blanks kept (measured)",
        "[S]\nK=a \\\n   b\n",
        "a     b",
    ),
    (
        "systemd+fleet: a blank after the backslash is no continuation; refused, not swallowed",
        "[S]\nK=/bin/foo \\ \nExecStartPre=/bin/bar\n",
        refused("ends in a backslash followed by spaces"),
    ),
    ("systemd config_parse: an escaped backslash does not continue", "[S]\nK=a\\\\\nL=b\n", "a\\\\"),
    (
        "systemd.syntax: comment lines inside a continuation are ignored",
        "[S]\nK=a \\\n# c\n; d\nb\n",
        "a  b",
    ),
    (
        "systemd (current): a comment ending in a backslash does not continue (measured)",
        "[S]\n# off \\\nK=live\n",
        "live",
    ),
    ("systemd.syntax: whitespace around '=' is ignored", "[S]\n  K  =  a b  \n", "a b"),
    ("systemd: a continuation at the end of the file ends the value", "[S]\nK=a \\", "a"),
    ("systemd: a UTF-8 byte order mark at the start is skipped", "\ufeff[S]\nK=a\n", "a"),
    (
        "systemd: '[ S ]' is a section called ' S ' (measured); refused",
        "[ S ]\nK=a\n",
        refused("blanks around it"),
    ),
    ("systemd string_is_safe: no quotes in a section header", '[S"]\nK=a\n', refused("quotes")),
]


@pytest.mark.parametrize(("rule", "text", "expected"), TEXT, ids=[row[0] for row in TEXT])
def test_unit_file_text(rule: str, text: str, expected) -> None:
    if isinstance(expected, tuple):
        with pytest.raises(InvalidUnitFile) as err:
            UnitFile.parse(text)
        assert expected[1] in str(err.value)
    else:
        assert UnitFile.parse(text).values("S", "K") == [expected]


def test_fleet_era_trap_comment_ending_in_backslash_is_reported() -> None:
    # fleet: go-systemd's lexer swallowed the next line into the comment; systemd < v2xx too.
    assert swallowed_by_comments("[S]\n# off \\\nK=live\n") == [(3, "K=live")]


# --- API option values: (rule, value, stored value, or refused(fragment)) ---------------------
VALUES = [
    (
        "fleet: Go fleetctl sends a continued value with its backslash-newline",
        "/bin/a \\\n  b",
        "/bin/a    b",
    ),
    (
        "fleet+systemd: a value ending in a backslash swallows the next option: refused",
        "/bin/a \\",
        refused("ends in a backslash"),
    ),
    (
        "fleet writes a bare newline as a new line (a hidden directive): refused",
        "/bin/a\nExecStartPre=/bin/evil",
        refused("line break"),
    ),
    ("systemd: blanks around a value are dropped", " \t/bin/a\t ", "/bin/a"),
    ("unit files are text: control characters refused (B3)", "/bin/a\x1cb", refused("U+001C")),
]


@pytest.mark.parametrize(("rule", "value", "expected"), VALUES, ids=[row[0] for row in VALUES])
def test_api_option_values(rule: str, value: str, expected) -> None:
    option = {"section": "Service", "name": "ExecStart", "value": value}
    if isinstance(expected, tuple):
        with pytest.raises(InvalidUnitFile) as err:
            UnitFile.from_options([option])
        assert expected[1] in str(err.value)
    else:
        unit = UnitFile.from_options([option])
        assert unit.values("Service", "ExecStart") == [expected]
        assert UnitFile.parse(unit.to_text()) == unit


# --- unit names: (rule, name, accepted) -------------------------------------------------------
NAMES = [
    ("systemd unit_name_is_valid: backslash escapes (systemd-escape)", "foo\\x2dbar.service", True),
    ("systemd unit_name_is_valid: device names from systemd-escape --path", "dev-sda\\x2d1.device", True),
    ("systemd unit_name_is_valid: the instance may hold '@'", "a@b@c.service", True),
    ("systemd unit_name_is_valid: '..' is fine before the type (B1)", "a..service", True),
    ("systemd unit_name_is_valid: the last '.' may not be first", ".service", False),
    ("systemd unit_name_is_valid: '@' may not be first", "@x.service", False),
    ("systemd unit_name_is_valid: UNIT_NAME_MAX is 256 with the NUL", "a" * 248 + ".service", False),
    ("systemd unit_type_may_template: mounts are no templates", "a@b.mount", False),
    ("systemd: no .snapshot units any more (fleet listed them)", "a.snapshot", False),
    ("fleet api.ValidateName: no '/' in a name", "a/b.service", False),
]


@pytest.mark.parametrize(("rule", "name", "accepted"), NAMES, ids=[row[0] for row in NAMES])
def test_unit_names(rule: str, name: str, accepted: bool) -> None:
    if accepted:
        assert UnitName.parse(name).full == name
    else:
        with pytest.raises(InvalidUnitName):
            UnitName.parse(name)


# --- globs: (rule, pattern, name, matches or "bad") -------------------------------------------
GLOBS = [
    ("Go path.Match: '[^1]' negates a class", "web@[^1].service", "web@2.service", True),
    ("Go path.Match: '[^1]' negates a class", "web@[^1].service", "web@1.service", False),
    (
        "Go path.Match: '[!1]' is the class of '!' and '1', no negation",
        "web@[!1].service",
        "web@2.service",
        False,
    ),
    (
        "Go path.Match: '[!1]' is the class of '!' and '1', no negation",
        "web@[!1].service",
        "web@!.service",
        True,
    ),
    ("Go path.Match: '\\' escapes the next character", "web@\\*.service", "web@*.service", True),
    ("Go path.Match: '\\' escapes the next character", "web@\\*.service", "web@1.service", False),
    (
        "Go path.Match: '\\x2d' matches 'x2d', not an escaped name",
        "a\\x2db.service",
        "a\\x2db.service",
        False,
    ),
    ("Go path.Match: '*' matches any run", "web@*.service", "web@1.service", True),
    ("Go path.Match: ranges", "web@[1-3].service", "web@2.service", True),
    ("Go path.Match: an unclosed class is ErrBadPattern", "web@[1.service", "web@1.service", "bad"),
    ("Go path.Match: an empty class is ErrBadPattern", "web@[].service", "web@1.service", "bad"),
]


@pytest.mark.parametrize(
    ("rule", "pattern", "name", "expected"), GLOBS, ids=[f"{r[0]} {r[1]}" for r in GLOBS]
)
def test_globs(rule: str, pattern: str, name: str, expected) -> None:
    if expected == "bad":
        with pytest.raises(BadPattern):
            glob_match(pattern, name)
    else:
        assert glob_match(pattern, name) is expected


# --- [X-Fleet]: (rule, unit name, section body, expected attributes, or refused(fragment)) ----
XFLEET = [
    (
        "fleet unit.parseMultivalueLine: quotes stripped, split into words",
        "a.service",
        'Conflicts="web@*.service" "db.service"',
        {"conflicts": ("web@*.service", "db.service")},
    ),
    (
        "fleet job.Conflicts: split at whitespace",
        "a.service",
        "Conflicts=web@*.service db.service",
        {"conflicts": ("web@*.service", "db.service")},
    ),
    (
        "fleet parseMultivalueLine: a quoted MachineID",
        "a.service",
        'MachineID="abc123"',
        {"machine_id": "abc123"},
    ),
    (
        "fleet parseMultivalueLine: a quoted MachineOf",
        "a.service",
        'MachineOf="db.service"',
        {"machine_of": ("db.service",)},
    ),
    (
        "fleet parseMultivalueLine: a quoted Replaces",
        "a.service",
        'Replaces="old.service"',
        {"replaces": ("old.service",)},
    ),
    (
        "fleet agent.hasReplace: Replaces is a glob",
        "a.service",
        "Replaces=old@*.service",
        {"replaces": ("old@*.service",)},
    ),
    ("fleet isTruthyValue: a quoted Global", "a.service", 'Global="true"', {"is_global": True}),
    *[
        (f"fleet isTruthyValue: Global={word} is true", "a.service", f"Global={word}", {"is_global": True})
        for word in ("true", "True", "TRUE", "t", "T", "1", "yes", "on")
    ],
    *[
        (
            f"fleet + systemd parse_boolean: Global={word} is false",
            "a.service",
            f"Global={word}",
            {"is_global": False},
        )
        for word in ("false", "False", "f", "0", "no", "off", "n")
    ],
    (
        "fleet read Global=y as false, systemd as true: refused",
        "a.service",
        "Global=y",
        refused("fleet read it as false"),
    ),
    (
        "fleet read any other Global as false: refused",
        "a.service",
        "Global=ture",
        refused("fleet read it as false"),
    ),
    ("fleet IsGlobal: the last Global wins", "a.service", "Global=true\nGlobal=false", {"is_global": False}),
    (
        "fleet RequiredTargetMetadata: key=value pairs, quoted words",
        "a.service",
        'MachineMetadata="region=us-east" "disk=ssd"',
        {"machine_metadata": (("region", frozenset({"us-east"})), ("disk", frozenset({"ssd"})))},
    ),
    (
        "fleet RequiredTargetMetadata ignored an entry without exactly one '=': refused",
        "a.service",
        "MachineMetadata=region",
        refused("so fleet ignored it"),
    ),
    (
        "fleet ignored unquoted pairs on one line; fleetpy requires both and warns",
        "a.service",
        "MachineMetadata=region=us disk=ssd",
        {"machine_metadata": (("region", frozenset({"us"})), ("disk", frozenset({"ssd"})))},
    ),
    (
        "fleet unitPrintf: %i in a template is checked for each instance (MachineMetadata)",
        "web@.service",
        "MachineMetadata=hostname=%i",
        {"machine_metadata": (("hostname", frozenset({"%i"})),)},
    ),
    (
        "fleet unitPrintf: %i expands for an instance",
        "web@node1.service",
        "MachineMetadata=hostname=%i",
        {"machine_metadata": (("hostname", frozenset({"node1"})),)},
    ),
    ("fleet unitPrintf: MachineID=%i in a template", "web@.service", "MachineID=%i", {"machine_id": "%i"}),
    (
        "fleet unitPrintf: MachineID=%i in an instance",
        "web@abc.service",
        "MachineID=%i",
        {"machine_id": "abc"},
    ),
    (
        "fleet unitPrintf: %% is not a specifier to fleet",
        "a.service",
        "MachineMetadata=pct=50%%",
        {"machine_metadata": (("pct", frozenset({"50%%"})),)},
    ),
    (
        "fleet job.validRequirements: deprecated X-Condition* names accepted",
        "a.service",
        "X-ConditionMachineOf=db.service",
        {"machine_of": ("db.service",)},
    ),
    (
        "fleet warned on unknown keys; fleetpy refuses typos",
        "a.service",
        "MachineIDs=abc",
        refused("unknown [X-Fleet] option"),
    ),
    (
        "fleet path.Match error matched nothing: malformed glob refused",
        "a.service",
        "Conflicts=web@[.service",
        refused("is not a glob fleet could match"),
    ),
    (
        "fleet kept quotes inside an unquoted value: refused",
        "a.service",
        'MachineMetadata=region="us"',
        refused("fleet reads quotes only around whole words"),
    ),
]


@pytest.mark.parametrize(("rule", "name", "body", "expected"), XFLEET, ids=[row[0] for row in XFLEET])
def test_x_fleet_options(rule: str, name: str, body: str, expected) -> None:
    unit = UnitFile.parse(SERVICE + "[X-Fleet]\n" + body + "\n")
    if isinstance(expected, tuple):
        with pytest.raises(InvalidFleetOptions) as err:
            parse_fleet_options(name, unit)
        assert expected[1] in str(err.value)
    else:
        options = parse_fleet_options(name, unit)
        assert {key: getattr(options, key) for key in expected} == expected


def test_unquoted_metadata_pairs_warn_how_fleet_read_them() -> None:
    unit = UnitFile.parse(SERVICE + "[X-Fleet]\nMachineMetadata=region=us disk=ssd\n")
    (warning,) = parse_fleet_options("a.service", unit).warnings
    assert "fleet read this as one entry and ignored it" in warning


# --- the scheduler uses the same globs ------------------------------------------------------
M1, M2 = "1" * 32, "2" * 32


def _job(name: str, fleet: str) -> tuple[Job, object]:
    unit = load_unit(name, SERVICE + "[X-Fleet]\n" + fleet + "\n")
    return Job(name=name, hash=unit.hash, desired_state="launched"), unit


def test_scheduler_conflicts_follow_path_match_negation() -> None:
    # fleet: Conflicts=web@[^1].service keeps web@2 off web@1's machine.
    jobs = [_job("web@1.service", "Conflicts=web@[^1].service"), _job("web@2.service", "")]
    current = [Assignment("web@2.service", M1, jobs[1][1].hash, "launched")]
    placed = {a.unit: a.machine_id for a in plan([Machine(M1), Machine(M2)], jobs, current).assignments}
    assert placed == {"web@1.service": M2, "web@2.service": M1}


def test_scheduler_replaces_with_a_glob() -> None:
    # fleet: agent.hasReplace matches Replaces= with path.Match.
    jobs = [_job("old@1.service", ""), _job("new.service", "Replaces=old@*.service")]
    current = [Assignment("old@1.service", M2, jobs[0][1].hash, "launched")]
    placed = {a.unit: a.machine_id for a in plan([Machine(M1), Machine(M2)], jobs, current).assignments}
    assert placed == {"new.service": M2, "old@1.service": M1}
