"""fleetctl's progress line: shown on a terminal while it waits for many units, never in a pipe."""

from __future__ import annotations

import io

from fleetpy.cli.output import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_counts_on_a_terminal_and_clears_before_plain_lines():
    terminal = Terminal()
    progress = Progress(3, "launched", terminal)
    progress.update(2)
    progress.clear()
    progress.update(0)
    progress.clear()
    assert terminal.getvalue() == "\r1/3 units launched\r\033[K\r3/3 units launched\r\033[K"


def test_no_progress_line_in_a_pipe_or_for_one_unit():
    pipe, terminal = io.StringIO(), Terminal()
    for progress in (Progress(3, "launched", pipe), Progress(1, "launched", terminal)):
        progress.update(0)
        progress.clear()
    assert pipe.getvalue() == terminal.getvalue() == ""
