"""Glob patterns in Go's path.Match grammar: how fleet matched Conflicts=, Replaces= and
fleetctl's unit arguments, and so how fleetpy matches them, everywhere.

    pattern:  { term }
    term:     '*'    any run of characters but '/'
              '?'    any one character but '/'
              '[' [ '^' ] { range } ']'    a class, never empty; '^' negates it
              '\\' c the character c
              c      c itself
    range:    c | '\\' c | lo '-' hi      (c is not '\\', '-' or ']')

Unlike Python's fnmatch, "[!1]" is a class of "!" and "1" (not a negation) and a backslash
escapes. A pattern path.Match calls malformed ("[", "[]", "[-a]", "a\\") is refused with a
reason, where fleet silently matched nothing.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from fleetpy.unit.errors import UnitError


class BadPattern(UnitError):
    """A glob pattern that Go's path.Match would reject as malformed."""


@dataclass(frozen=True)
class _Class:
    negated: bool
    ranges: tuple[tuple[str, str], ...]


_STAR = "*"
_ONE = "?"
# A term is _STAR, _ONE, a one-character literal wrapped in a tuple, or a _Class.
_Term = str | tuple[str] | _Class


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str) -> tuple[_Term, ...]:
    terms: list[_Term] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "*":
            if not terms or terms[-1] != _STAR:
                terms.append(_STAR)
            i += 1
        elif char == "?":
            terms.append(_ONE)
            i += 1
        elif char == "\\":
            if i + 1 == len(pattern):
                raise BadPattern(f"pattern {pattern!r} ends in a backslash, which escapes nothing")
            terms.append((pattern[i + 1],))
            i += 2
        elif char == "[":
            klass, i = _compile_class(pattern, i + 1)
            terms.append(klass)
        else:
            terms.append((char,))
            i += 1
    return tuple(terms)


def _compile_class(pattern: str, i: int) -> tuple[_Class, int]:
    negated = pattern.startswith("^", i)
    if negated:
        i += 1
    ranges: list[tuple[str, str]] = []
    while True:
        if i < len(pattern) and pattern[i] == "]" and ranges:
            return _Class(negated, tuple(ranges)), i + 1
        lo, i = _class_char(pattern, i)
        hi = lo
        if pattern[i] == "-":
            hi, i = _class_char(pattern, i + 1)
        ranges.append((lo, hi))


def _class_char(pattern: str, i: int) -> tuple[str, int]:
    """One character of a class (path.Match's getEsc), and the index after it."""
    if i >= len(pattern):
        raise BadPattern(f"pattern {pattern!r} has a '[' without its ']'")
    if pattern[i] in "-]":
        raise BadPattern(
            f"pattern {pattern!r}: a class may not be empty or begin a range with {pattern[i]!r}; "
            f"escape it as \\{pattern[i]}"
        )
    if pattern[i] == "\\":
        i += 1
        if i >= len(pattern):
            raise BadPattern(f"pattern {pattern!r} has a '[' without its ']'")
    if i + 1 >= len(pattern):
        raise BadPattern(f"pattern {pattern!r} has a '[' without its ']'")
    return pattern[i], i + 1


def check_pattern(pattern: str) -> None:
    """Raise BadPattern, with the reason, if path.Match would call `pattern` malformed."""
    _compile(pattern)


def glob_match(pattern: str, name: str) -> bool:
    """Whether `name` matches `pattern` as Go's path.Match decides; BadPattern if malformed."""
    return _regex(pattern).fullmatch(name) is not None


@functools.lru_cache(maxsize=1024)
def _regex(pattern: str) -> re.Pattern[str]:
    """The pattern's terms as a regular expression: the same language, matched in C."""
    parts = []
    for term in _compile(pattern):
        if term == _STAR:
            parts.append("[^/]*")
        elif term == _ONE:
            parts.append("[^/]")
        elif isinstance(term, _Class):
            parts.append(_class_regex(term))
        else:
            parts.append(re.escape(term[0]))
    return re.compile("".join(parts))


def _class_regex(klass: _Class) -> str:
    # A range whose ends are out of order matches nothing in path.Match, and is an error to re.
    ranges = "".join(
        re.escape(lo) if lo == hi else f"{re.escape(lo)}-{re.escape(hi)}"
        for lo, hi in klass.ranges
        if lo <= hi
    )
    if not ranges:
        return "[\\s\\S]" if klass.negated else "(?!)"
    return f"[{'^' if klass.negated else ''}{ranges}]"
