"""`-o json|yaml|wide` for fleetctl's list and status commands: one place for machine-readable output.

json and yaml print the API's own records (fleet's field names, documented in the README), so a
script sees the same names whatever it asks; wide is the table with every column, unabridged.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

FORMATS = ("table", "wide", "json", "yaml")


def output_option(command: Callable) -> Callable:
    return click.option(
        "-o",
        "--output",
        type=click.Choice(FORMATS),
        default="table",
        show_default=True,
        help="table, wide (every column, nothing shortened), json or yaml",
    )(command)


def structured(output: str) -> bool:
    return output in ("json", "yaml")


def emit(records: Any, output: str) -> None:
    """Print `records` (JSON-shaped data) as JSON or YAML."""
    if output == "json":
        click.echo(json.dumps(records, indent=2, sort_keys=True))
    else:
        import yaml  # only scripts that ask for YAML pay for it

        click.echo(yaml.safe_dump(records, sort_keys=True, default_flow_style=False), nl=False)


class Progress:
    """A "3/10 units launched" line on a terminal while fleetctl waits; nothing otherwise.

    The line lives on stderr and is cleared before each round, so the plain "Unit ... launched"
    lines printed in between start at the left margin, and piped output stays plain lines.
    """

    def __init__(self, total: int, what: str, stream: Any = None):
        self.total = total
        self.what = what
        self.stream = stream or sys.stderr
        self.shown = total > 1 and self.stream.isatty()

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def update(self, left: int) -> None:
        if self.shown:
            self.stream.write(f"\r{self.total - left}/{self.total} units {self.what}")
            self.stream.flush()
