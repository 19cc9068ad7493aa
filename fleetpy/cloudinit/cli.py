"""The "validate" command: check cloud-config files and print what is wrong with them."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fleetpy.cloudinit.validate import validate


@click.command("validate")
@click.argument(
    "files",
    nargs=-1,
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="text: one FILE:LINE:COL: SEVERITY: MESSAGE line per finding; json: a list of objects.",
)
def validate_command(files: tuple[Path, ...], output_format: str) -> None:
    """Validate #cloud-config user-data FILEs; exit status 1 if any has an error."""
    results: list[dict[str, object]] = []
    for path in files:
        # Decode leniently so one stray byte is reported as a finding, not a traceback.
        text = path.read_bytes().decode("utf-8", errors="replace")
        results.extend({"file": str(path), **f.to_json()} for f in validate(text))
    if output_format == "json":
        click.echo(json.dumps(results, indent=2))
    else:
        for r in results:
            click.echo(f"{r['file']}:{r['line']}:{r['column']}: {r['severity']}: {r['message']}")
    if any(r["severity"] == "error" for r in results):
        raise SystemExit(1)
