"""The glob matcher against a direct reading of Go's path.Match grammar, on random patterns."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fleetpy.unit.glob import BadPattern, check_pattern, glob_match


def _class(pattern: str, i: int) -> tuple[bool, list[tuple[str, str]], int]:
    """Parse a class after its '[' (the pattern is known to be well formed)."""
    negated = pattern[i] == "^"
    i += negated
    ranges: list[tuple[str, str]] = []
    while not (pattern[i] == "]" and ranges):
        i += pattern[i] == "\\"
        lo = hi = pattern[i]
        i += 1
        if pattern[i] == "-":
            i += 1 + (pattern[i + 1] == "\\")
            hi = pattern[i]
            i += 1
        ranges.append((lo, hi))
    return negated, ranges, i + 1


def reference(pattern: str, name: str) -> bool:
    """path.Match's terms, matched by plain backtracking."""
    if not pattern:
        return not name
    head = pattern[0]
    if head == "*":
        return any(reference(pattern[1:], name[k:]) for k in range(len(name) + 1) if "/" not in name[:k])
    if not name:
        return False
    if head == "?":
        return name[0] != "/" and reference(pattern[1:], name[1:])
    if head == "\\":
        return name[0] == pattern[1] and reference(pattern[2:], name[1:])
    if head == "[":
        negated, ranges, end = _class(pattern, 1)
        inside = any(lo <= name[0] <= hi for lo, hi in ranges)
        return inside != negated and reference(pattern[end:], name[1:])
    return head == name[0] and reference(pattern[1:], name[1:])


@given(st.text("ab*?[]^!-\\/", max_size=8), st.text("ab!-^]/\\", max_size=6))
def test_glob_match_agrees_with_path_match_grammar(pattern: str, name: str) -> None:
    try:
        check_pattern(pattern)
    except BadPattern:
        return
    assert glob_match(pattern, name) is reference(pattern, name)
