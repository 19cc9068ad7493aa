"""`fleetctl events`: the cluster's recent events, like `kubectl get events`."""

from __future__ import annotations

import json

import click

import fleetpy.unit as fleet_unit
from fleetpy.cli.complete import machine_ids, unit_names
from fleetpy.cli.output import emit, output_option, structured
from fleetpy.conf.values import machine_id_prefix

COLUMNS = ("TIME", "TYPE", "KIND", "MACHINE", "MESSAGE")
# Fixed widths, so followed events line up with the ones before them ("EtcdUnreachable" is 15).
WIDTHS = (19, 7, 15, 8)


def event_row(event: dict) -> list[str]:
    """TIME (UTC, to the second), TYPE, KIND, MACHINE (short id) and MESSAGE of one event."""
    when = event["time"].replace("T", " ")[:19]
    return [
        when,
        event["type"],
        event["kind"],
        machine_id_prefix(event.get("machineID") or "-"),
        event["message"],
    ]


def event_line(row: list[str] | tuple[str, ...]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(row, WIDTHS, strict=False)) + "  " + row[-1]


def event_lines(events: list[dict], legend: bool = True) -> list[str]:
    return ([event_line(COLUMNS)] if legend else []) + [event_line(event_row(e)) for e in events]


@click.command("events")
@click.option("-f", "--follow", is_flag=True, help="keep printing events as they are recorded")
@click.option("--unit", help="only events about this unit", shell_complete=unit_names)
@click.option(
    "--machine", help="only events about this machine (an id or its prefix)", shell_complete=machine_ids
)
@click.option(
    "--limit", default=100, show_default=True, type=click.IntRange(min=0), help="most recent events shown"
)
@click.option("--no-legend", is_flag=True, help="do not print column headers")
@output_option
@click.pass_obj
def events_command(
    session, follow: bool, unit: str | None, machine: str | None, limit: int, no_legend: bool, output: str
) -> None:
    """Show what happened in the cluster: machines joining and lost, units scheduled, started,
    failed, moved or pending (with why), leader changes and etcd outages (fleetpy extension)."""
    client = session.client
    if unit:
        unit = fleet_unit.mangle_unit_name(unit)
    if not follow:
        events = client.events(unit, machine, limit)
        if structured(output):
            emit(events, output)
            return
        for line in event_lines(events, legend=not no_legend):
            click.echo(line)
        return
    if structured(output):
        # One JSON object per line as events come (YAML has no streaming form worth the name).
        for event in client.follow_events(unit, machine, limit):
            click.echo(json.dumps(event, sort_keys=True))
        return
    if not no_legend:
        click.echo(event_line(COLUMNS))
    for event in client.follow_events(unit, machine, limit):
        click.echo(event_line(event_row(event)))
