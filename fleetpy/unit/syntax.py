"""systemd's unit file grammar: where lines end, continuations, comments, and what a section
name, option name or value may hold so that the file reads back exactly as it was meant.

The rules follow systemd's config_parse (measured against systemd 252) where fleet's reader
(go-systemd) agrees, and refuse the input where the two disagree:

- A line ends at LF or CRLF. systemd also ends one at a lone CR or a NUL, fleet did not, so
  a lone CR or a NUL anywhere is refused rather than read one way or the other.
- A line is continued when it ends in an unescaped backslash (an odd number of them), with
  nothing after it: "a \\ " (a space after the backslash) is not continued. The backslash
  becomes a space and the next line is appended as it is, inner whitespace kept.
- A line whose first non-blank character is "#" or ";" is a comment, also inside a
  continuation, and a comment is never continued.
- Spaces and tabs around a section header, an option name and a value are dropped.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator

from fleetpy.unit.errors import InvalidUnitFile

# What systemd strips around a line, a key and a value once the text is split into lines.
BLANKS = " \t"
COMMENT_STARTS = ("#", ";")
BOM = "\ufeff"

# Where systemd and fleet disagree on where a line ends.
_AMBIGUOUS_LINE_END = re.compile("\r(?!\n)|\x00")


def is_continued(line: str) -> bool:
    """Whether `line` ends in a backslash that is not itself escaped (systemd's rule)."""
    trailing = len(line) - len(line.rstrip("\\"))
    return trailing % 2 == 1


def is_comment(line: str) -> bool:
    return line.lstrip(BLANKS).startswith(COMMENT_STARTS)


def _describe(char: str) -> str:
    name = unicodedata.name(char, "") or {
        "\x00": "NUL",
        "\t": "TAB",
        "\n": "LINE FEED",
        "\r": "CARRIAGE RETURN",
        "\x0b": "LINE TABULATION",
        "\x0c": "FORM FEED",
        "\x85": "NEXT LINE",
    }.get(char, "control character")
    return f"U+{ord(char):04X} ({name})"


def _forbidden(char: str) -> bool:
    """Control characters (TAB aside), Unicode line/paragraph separators and lone surrogates.

    systemd reads most of them as ordinary text, but some end a line for systemd and not for
    fleet, and other tools (terminals, Python's splitlines) show the rest as line breaks, so
    a unit holding one could look different from what runs.
    """
    if char == "\t":
        return False
    return unicodedata.category(char) in ("Cc", "Zl", "Zp", "Cs")


# `_forbidden` as one character class, so a text is searched at C speed rather than a Python
# call per character (every unit file is read by the API, the engine and an agent): the
# categories Cc, Zl, Zp and Cs hold exactly these code points, TAB aside.
_FORBIDDEN = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def first_forbidden(text: str, allowed: str = "") -> str | None:
    for match in _FORBIDDEN.finditer(text):
        if match.group() not in allowed:
            return match.group()
    return None


def check_section(section: str) -> str | None:
    """Why `section` cannot be a section name, or None.

    systemd refuses a header holding control characters, quotes or backslashes, and reads
    "[ Service ]" as a section called " Service ", which is never the one meant.
    """
    if not section:
        return "section name is empty"
    bad = first_forbidden(section)
    if bad:
        return f"section name {section!r} holds {_describe(bad)}; section names are plain text on one line"
    if set(section) & set("[]\"'\\"):
        return f"section name {section!r} may not contain brackets, quotes or backslashes"
    if section != section.strip(BLANKS) or section != section.strip():
        return f"section name {section!r} has blanks around it; write it as [{section.strip()}]"
    return None


def check_name(name: str) -> str | None:
    """Why `name` cannot be an option name, or None."""
    if not name:
        return "option name is empty"
    bad = first_forbidden(name)
    if bad:
        return f"option name {name!r} holds {_describe(bad)}; option names are plain text on one line"
    if any(char.isspace() for char in name) or set(name) & set("=[]"):
        return f"option name {name!r} may not contain spaces, '=', brackets or line breaks"
    if name.startswith(COMMENT_STARTS):
        return f"option name {name!r} may not start with '#' or ';', which begin a comment"
    return None


def check_value(value: str) -> str | None:
    """Why `value` cannot be written on one `Name=value` line and read back unchanged, or None."""
    bad = first_forbidden(value)
    if bad:
        return _holds(value, bad)
    if value != value.strip(BLANKS):
        return f"value {_clip(value)} has spaces or tabs around it, which systemd drops"
    if is_continued(value):
        return (
            f"value {_clip(value)} ends in a backslash, which systemd reads as a line "
            "continuation that swallows the next option; remove it, or double it (\\\\) "
            "if a backslash is meant"
        )
    return None


def read_value(value: str) -> str:
    """The value systemd reads when fleet writes `Name=value` into a unit file.

    fleet's clients send a continued value as it was in the file ("a \\\\\\n  b"), so a
    line feed right after an unescaped backslash is a continuation, read as systemd reads
    it. Any other line break would start a line of its own (an option fleet never showed),
    and a value ending in a backslash would swallow the next option: both are refused, as
    are the characters `check_value` refuses. Blanks around the value are dropped, as
    systemd drops them.
    """
    text = value.replace("\r\n", "\n")
    bad = first_forbidden(text, allowed="\n")
    if bad:
        raise InvalidUnitFile(_holds(value, bad))
    lines = text.split("\n")
    joined = lines[0]
    for index, line in enumerate(lines[1:], start=1):
        if not is_continued(joined):
            if any(rest.strip(BLANKS) for rest in lines[index:]):
                raise InvalidUnitFile(
                    f"value {_clip(value)} holds a line break; systemd would read the text after "
                    "it as a line of its own. Put it in an option of its own, or end the line "
                    "with a backslash to continue the value"
                )
            break
        if is_comment(line):
            continue  # systemd skips comment lines inside a continued value
        joined = joined[:-1] + " " + line
    problem = check_value(joined.strip(BLANKS))
    if problem:
        raise InvalidUnitFile(problem)
    return joined.strip(BLANKS)


def physical_lines(text: str) -> list[str]:
    """The lines of `text` as systemd and fleet both split them, LF and CRLF being line ends."""
    text = text.removeprefix(BOM)
    ambiguous = _AMBIGUOUS_LINE_END.search(text)
    if ambiguous:
        lineno = text.count("\n", 0, ambiguous.start()) + 1
        line = text.split("\n")[lineno - 1]
        raise InvalidUnitFile(
            f"line {lineno}: {_describe(ambiguous.group())} in {_clip(line)}; systemd ends a line "
            "there and fleet did not, so the unit would mean different things to each. Use "
            "line feeds only"
        )
    return text.replace("\r\n", "\n").split("\n")


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Yield (number of its first line, text) for each line that is not blank or a comment."""
    pending: str | None = None
    start = 0
    for number, raw in enumerate(physical_lines(text), start=1):
        if is_comment(raw):
            continue
        if pending is None:
            start = number
            line = raw
        else:
            line = pending + raw
        if is_continued(line):
            pending = line[:-1] + " "
            continue
        pending = None
        if line.strip(BLANKS):
            yield start, line.strip(BLANKS)
    if pending is not None and pending.strip(BLANKS):
        yield start, pending.strip(BLANKS)


def swallowed_by_comments(text: str) -> list[tuple[int, str]]:
    """Lines that fleet, and the systemd of fleet's day, read as part of a comment before them.

    A comment ending in a backslash continued into the next line there; current systemd (and
    fleetpy) read that next line as live, so a line someone once commented out comes back.
    """
    found = []
    swallowing = False
    for number, line in enumerate(physical_lines(text), start=1):
        if swallowing:
            if line.strip(BLANKS) and not is_comment(line):
                found.append((number, line.strip(BLANKS)))
        elif not is_comment(line):
            continue
        # go-systemd dropped one trailing space before looking for the backslash.
        swallowing = line.removesuffix(" ").endswith("\\")
    return found


def _holds(value: str, bad: str) -> str:
    return (
        f"value {_clip(value)} holds {_describe(bad)}; systemd, fleet or a terminal would show "
        "or read the text after it differently (as a line of its own, or not at all), so remove it"
    )


def _clip(value: str, limit: int = 60) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")
