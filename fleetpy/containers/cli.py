"""`fleetpy new-unit`: write a container unit generated from the template."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from fleetpy.containers.generate import NETWORKS, RESTART_POLICIES, RUNTIMES, generate_unit


@click.command("new-unit")
@click.argument("name")
@click.option("--image", required=True, help="Image reference, e.g. localhost/fleetpy-busybox.")
@click.option("--runtime", type=click.Choice(sorted(RUNTIMES)), default="podman", show_default=True)
@click.option("--port", "ports", multiple=True, help="[ip:]hostPort:containerPort[/proto]; repeatable.")
@click.option("--env", "env", multiple=True, help="KEY=VALUE for the container; repeatable.")
@click.option(
    "--volume",
    "volumes",
    multiple=True,
    help="/abs/src:/abs/dst[:ro], or NAME[:local|shared]:/abs/dst[:ro] for a fleet volume; repeatable.",
)
@click.option("--conflicts", multiple=True, help="[X-Fleet] Conflicts glob, e.g. 'web@*.service'.")
@click.option("--metadata", multiple=True, help="[X-Fleet] MachineMetadata key=value; repeatable.")
@click.option("--global", "is_global", is_flag=True, help="[X-Fleet] Global=true.")
@click.option("--machine-of", help="[X-Fleet] MachineOf unit.")
@click.option(
    "--command", "command", help="Command and arguments for the container, split like a shell would."
)
@click.option("--restart", type=click.Choice(RESTART_POLICIES), default="always", show_default=True)
@click.option("--network", type=click.Choice(NETWORKS), help="Container network mode.")
@click.option("--description", help="Description= of the unit.")
@click.option(
    "--containers-conf", help="podman: absolute path for CONTAINERS_CONF in the unit's environment."
)
@click.option("--storage-conf", help="podman: absolute path for CONTAINERS_STORAGE_CONF.")
@click.option(
    "--start-timeout", type=int, default=300, show_default=True, help="TimeoutStartSec (slow pulls)."
)
@click.option(
    "--stop-timeout", type=int, default=10, show_default=True, help="Seconds the container gets to stop."
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write; ./NAME by default.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def new_unit_command(
    name: str,
    command: str | None,
    output: Path | None,
    force: bool,
    **options,
) -> None:
    """Write a unit NAME that runs a container in the foreground, with fleet scheduling options."""
    try:
        argv = shlex.split(command) if command else []
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--command") from err
    try:
        text = generate_unit(name, command=argv, **options)
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    path = output or Path(name)
    if path.exists() and not force:
        raise click.ClickException(f"{path} exists; pass --force to overwrite it")
    path.write_text(text)
    click.echo(f"wrote {path}")
