"""The "validate" and "apply" commands: check cloud-config files, and apply one to this machine."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fleetpy.cloudinit.apply import ApplyError, apply_user_data
from fleetpy.cloudinit.model import CloudConfigError
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


@click.command("apply")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/"),
    show_default=True,
    help="Write files under this directory instead of /; users are then not created.",
)
@click.option(
    "--systemd-bus",
    default="system",
    show_default=True,
    help="system, user, or a D-Bus address such as unix:path=/run/user/0/bus. Decides "
    "where coreos.units files go and which manager runs their commands.",
)
@click.option(
    "--private-ipv4", help="Value of $private_ipv4 (default: this machine's first non-loopback IPv4 address)."
)
@click.option("--public-ipv4", help="Value of $public_ipv4 (default: as for --private-ipv4).")
@click.option(
    "--no-commands",
    is_flag=True,
    help="Write everything but do not reload systemd or run coreos.units commands.",
)
@click.option("--dry-run", is_flag=True, help="Print what would change; change nothing.")
def apply_command(
    file: Path,
    root: Path,
    systemd_bus: str,
    private_ipv4: str | None,
    public_ipv4: str | None,
    no_commands: bool,
    dry_run: bool,
) -> None:
    """Apply #cloud-config user-data FILE: files, hostname, SSH keys, users, coreos.etcd2,
    coreos.fleet and coreos.units. Invalid user-data changes nothing (exit status 1)."""
    try:
        changes = apply_user_data(
            file.read_text(),
            root=root,
            bus=systemd_bus,
            private_ipv4=private_ipv4,
            public_ipv4=public_ipv4,
            dry_run=dry_run,
            run_commands=not no_commands,
            echo=click.echo,
        )
    except CloudConfigError as err:
        for f in err.findings:
            click.echo(f"{file}:{f.line}:{f.column}: {f.severity}: {f.message}", err=True)
        raise click.ClickException(f"{file}: invalid user-data; nothing was changed") from None
    except ApplyError as err:
        raise click.ClickException(str(err)) from None
    summary = f"{changes} change(s)" if changes else "no changes"
    click.echo(f"{summary} (dry run)" if dry_run else summary)
