"""systemd unit files: parsing, fleet's JSON option form and canonical text."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from fleetpy.unit.errors import InvalidUnitFile

_COMMENT_STARTS = ("#", ";")
_BAD_NAME_CHARS = frozenset("=[]\n\r\t ")
_BAD_SECTION_CHARS = frozenset("[]\n\r")


def _check_section(section: str) -> str | None:
    if not section:
        return "section name is empty"
    if _BAD_SECTION_CHARS & set(section):
        return f"section name {section!r} may not contain brackets or line breaks"
    return None


def _check_name(name: str) -> str | None:
    if not name:
        return "option name is empty"
    if _BAD_NAME_CHARS & set(name):
        return f"option name {name!r} may not contain spaces, '=', brackets or line breaks"
    return None


@dataclass(frozen=True)
class UnitOption:
    """One Key=Value assignment and the section it belongs to."""

    section: str
    name: str
    value: str


@dataclass(frozen=True)
class UnitFile:
    """An ordered set of unit options, held grouped by section.

    Options are regrouped so that all of a section's options sit together in
    the order sections first appear; systemd reads a re-opened section as one,
    so two files that differ only in that respect are equal and hash the same.
    """

    options: tuple[UnitOption, ...]

    def __post_init__(self) -> None:
        order: dict[str, list[UnitOption]] = {}
        for option in self.options:
            order.setdefault(option.section, []).append(option)
        grouped = tuple(opt for opts in order.values() for opt in opts)
        object.__setattr__(self, "options", grouped)

    @classmethod
    def parse(cls, text: str) -> UnitFile:
        options: list[UnitOption] = []
        section: str | None = None
        for lineno, line in _logical_lines(text):
            if line.startswith("["):
                if not line.endswith("]"):
                    raise InvalidUnitFile(
                        f"line {lineno}: bad section header {line!r}; write it as [Name] on a line of its own"
                    )
                problem = _check_section(line[1:-1])
                if problem:
                    raise InvalidUnitFile(f"line {lineno}: {problem}")
                section = line[1:-1]
                continue
            key, eq, value = line.partition("=")
            if not eq:
                raise InvalidUnitFile(
                    f"line {lineno}: {line!r} is not a Key=Value assignment, a [Section] header or a comment"
                )
            if section is None:
                raise InvalidUnitFile(
                    f"line {lineno}: option {key.strip()!r} comes before any section; "
                    "put a header such as [Unit] or [Service] above it"
                )
            key = key.strip()
            problem = _check_name(key)
            if problem:
                raise InvalidUnitFile(f"line {lineno}: {problem}")
            options.append(UnitOption(section, key, value.strip()))
        if not options:
            raise InvalidUnitFile(
                "unit file has no options; a unit needs at least one Key=Value line under a [Section] header"
            )
        return cls(tuple(options))

    @classmethod
    def from_options(cls, options: list[dict]) -> UnitFile:
        """Build from fleet's API form: [{"section": .., "name": .., "value": ..}]."""
        if not isinstance(options, list):
            raise InvalidUnitFile(f"unit options must be a list of objects, not {type(options).__name__}")
        if not options:
            raise InvalidUnitFile("unit options are empty; a unit needs at least one option")
        parsed = []
        for index, item in enumerate(options):
            where = f"option {index}"
            if not isinstance(item, dict):
                raise InvalidUnitFile(
                    f"{where}: expected an object with section, name and value, got {type(item).__name__}"
                )
            missing = [k for k in ("section", "name", "value") if k not in item]
            if missing:
                raise InvalidUnitFile(f"{where}: missing {', '.join(missing)}")
            for key in ("section", "name", "value"):
                if not isinstance(item[key], str):
                    raise InvalidUnitFile(f"{where}: {key} must be a string, not {type(item[key]).__name__}")
            problem = _check_section(item["section"]) or _check_name(item["name"])
            if problem:
                raise InvalidUnitFile(f"{where}: {problem}")
            parsed.append(UnitOption(item["section"], item["name"], item["value"]))
        return cls(tuple(parsed))

    def to_options(self) -> list[dict]:
        return [{"section": o.section, "name": o.name, "value": o.value} for o in self.options]

    def to_text(self) -> str:
        """Canonical text; a value's line breaks become backslash continuations.

        systemd joins continuation lines with a space, so a value holding line
        breaks reads back with spaces in their place: that is what systemd runs.
        """
        blocks = []
        for section in self.sections():
            lines = [f"[{section}]"]
            for option in self.options:
                if option.section == section:
                    value = option.value.replace("\r\n", "\n").replace("\n", "\\\n")
                    lines.append(f"{option.name}={value}")
            blocks.append("\n".join(lines) + "\n")
        return "\n".join(blocks)

    @property
    def hash(self) -> str:
        """SHA-1 of the canonical text, the identity fleet gives unit contents."""
        return hashlib.sha1(self.to_text().encode()).hexdigest()

    def values(self, section: str, name: str) -> list[str]:
        return [o.value for o in self.options if o.section == section and o.name == name]

    def sections(self) -> list[str]:
        return list(dict.fromkeys(o.section for o in self.options))


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Yield (starting line number, stripped line) with continuations joined."""
    pending: list[str] = []
    start = 0
    for lineno, raw in enumerate(text.removeprefix("\ufeff").splitlines(), start=1):
        line = raw.strip()
        if pending:
            # systemd skips comment lines inside a continued value.
            if line.startswith(_COMMENT_STARTS):
                continue
        elif not line or line.startswith(_COMMENT_STARTS):
            continue
        else:
            start = lineno
        if line.endswith("\\"):
            pending.append(line[:-1].rstrip())
            continue
        pending.append(line)
        yield start, " ".join(p for p in pending if p)
        pending = []
    if pending:
        yield start, " ".join(p for p in pending if p)
