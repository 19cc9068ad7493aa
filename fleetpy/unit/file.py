"""systemd unit files: parsing, fleet's JSON option form and canonical text.

Every option of a UnitFile is canonical: it is written on one `Name=value` line and reads
back unchanged, by fleetpy and by systemd (the grammar is in `syntax`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from fleetpy.unit import syntax
from fleetpy.unit.errors import InvalidUnitFile


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
        for option in self.options:
            problem = (
                syntax.check_section(option.section)
                or syntax.check_name(option.name)
                or syntax.check_value(option.value)
            )
            if problem:
                raise InvalidUnitFile(f"[{option.section}] {option.name}: {problem}")
        order: dict[str, list[UnitOption]] = {}
        for option in self.options:
            order.setdefault(option.section, []).append(option)
        grouped = tuple(opt for opts in order.values() for opt in opts)
        object.__setattr__(self, "options", grouped)

    @classmethod
    def parse(cls, text: str) -> UnitFile:
        """Read unit file text as systemd does; refuse what systemd and fleet would read apart."""
        options: list[UnitOption] = []
        section: str | None = None
        for lineno, line in syntax.logical_lines(text):
            if line.startswith("["):
                if not line.endswith("]") or len(line) < 2:
                    raise InvalidUnitFile(
                        f"line {lineno}: bad section header {line!r}; write it as [Name] on a line of its own"
                    )
                problem = syntax.check_section(line[1:-1])
                if problem:
                    raise InvalidUnitFile(f"line {lineno}: {problem}")
                section = line[1:-1]
                continue
            key, eq, value = line.partition("=")
            if not eq:
                raise InvalidUnitFile(
                    f"line {lineno}: {line!r} is not a Key=Value assignment, a [Section] header or a comment"
                )
            key, value = key.strip(syntax.BLANKS), value.strip(syntax.BLANKS)
            if section is None:
                raise InvalidUnitFile(
                    f"line {lineno}: option {key!r} comes before any section; "
                    "put a header such as [Unit] or [Service] above it"
                )
            if syntax.is_continued(value):
                # Only a backslash with blanks after it gets here: not a continuation.
                raise InvalidUnitFile(
                    f"line {lineno}: {key}= ends in a backslash followed by spaces; systemd and "
                    "fleet do not continue such a line, so the next line stays an option of its "
                    "own and the backslash ends the value. Remove the spaces to continue the "
                    "line, or remove the backslash"
                )
            problem = syntax.check_name(key) or syntax.check_value(value)
            if problem:
                raise InvalidUnitFile(f"line {lineno}: {problem}")
            options.append(UnitOption(section, key, value))
        if not options:
            raise InvalidUnitFile(
                "unit file has no options; a unit needs at least one Key=Value line under a [Section] header"
            )
        return cls(tuple(options))

    @classmethod
    def from_options(cls, options: list[dict]) -> UnitFile:
        """Build from fleet's API form: [{"section": .., "name": .., "value": ..}].

        Each value is taken as systemd would read it from the file fleet writes: a continued
        value is joined, blanks around it dropped; what would change meaning is refused.
        """
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
            problem = syntax.check_section(item["section"]) or syntax.check_name(item["name"])
            if problem:
                raise InvalidUnitFile(f"{where}: {problem}")
            where += f" ([{item['section']}] {item['name']})"
            try:
                value = syntax.read_value(item["value"])
            except InvalidUnitFile as err:
                raise InvalidUnitFile(f"{where}: {err}") from None
            parsed.append(UnitOption(item["section"], item["name"], value))
        return cls(tuple(parsed))

    def to_options(self) -> list[dict]:
        return [{"section": o.section, "name": o.name, "value": o.value} for o in self.options]

    def to_text(self) -> str:
        """Canonical text: one line per option, sections apart by a blank line."""
        blocks = []
        for section in self.sections():
            lines = [f"[{section}]"]
            lines += [f"{o.name}={o.value}" for o in self.options if o.section == section]
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
