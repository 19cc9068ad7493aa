"""The `fleetpy` tool: everything that is not fleetctl (the local lab, cloud-config, container units,
registry maintenance).

The only command that composes the tool packages (lab, cloudinit, containers); fleetctl and
the rest of the core never import them.
"""

from __future__ import annotations

import click

from fleetpy.cli.registry import group as registry_group
from fleetpy.cloudinit.cli import apply_command, validate_command
from fleetpy.containers.cli import new_unit_command
from fleetpy.lab.cli import group as lab_group


@click.group("fleetpy", context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """fleetpy: a fleet-style cluster scheduler for systemd units, on etcd."""


@main.group("cloud-config")
def cloud_config() -> None:
    """Cloud-config user-data."""


cloud_config.add_command(validate_command)
cloud_config.add_command(apply_command)
main.add_command(lab_group)
main.add_command(new_unit_command)
main.add_command(registry_group)


if __name__ == "__main__":
    main()
