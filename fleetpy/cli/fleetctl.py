"""fleetctl: fleet's command-line tool, talking to fleetd's API through `fleetpy.client`.

API errors become "Error: ..." on stderr and exit status 1; usage errors exit 2 (click).
fleetctl is a short process: it imports what the command it runs needs and no more (fleetpy.unit
loads its parsers on first use), so `fleetctl list-machines` pays for click and the client.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import click

import fleetpy.unit as fleet_unit
from fleetpy import __version__
from fleetpy.cli.complete import machine_ids, unit_names
from fleetpy.cli.events import event_lines, events_command
from fleetpy.cli.output import Progress, emit, output_option, structured
from fleetpy.client import APIError, Client
from fleetpy.conf.values import format_bytes, short_machine_id

DEFAULT_ENDPOINT = "unix:///var/run/fleet.sock"
POLL_INTERVAL = 0.2
# One long poll of a blocking command: fleetd answers sooner when the units get there.
WAIT_SLICE = 4.0
# How long a started unit is watched for an immediate failure before fleetctl says "launched".
STARTUP_GRACE = 0.5
# fleet blocks forever by default; fleetpy gives up after 30 s unless told otherwise.
DEFAULT_BLOCK_ATTEMPTS = 150
TAB_WIDTH = 8
# An argument with one of these is a glob; a backslash alone is part of an escaped unit name.
_GLOB_CHARS = frozenset("*?[")
STATUS_EVENTS = 10  # recent events `status` shows after systemd's status, as kubectl describe


class _Group(click.Group):
    """Turns API and unit errors into click's "Error: ..." and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except APIError as error:
            raise click.ClickException(error.message) from None
        except (fleet_unit.UnitError, ValueError, OSError) as error:
            raise click.ClickException(str(error)) from None


class _Session:
    """The client for one invocation, plus the machine list fetched once for legends."""

    def __init__(
        self,
        endpoint: str,
        token: str | None,
        request_timeout: float,
        ssh_username: str,
        tls_files: dict[str, str | None] | None = None,
    ):
        self.endpoint = endpoint
        self.token = token
        self.request_timeout = request_timeout
        self.ssh_username = ssh_username
        self.tls_files = tls_files or {}
        self._client: Client | None = None
        self._machines: dict[str, dict] | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.endpoint, self.token, timeout=self.request_timeout, **self.tls_files)
        return self._client

    def machines(self) -> dict[str, dict]:
        if self._machines is None:
            self._machines = {m["id"]: m for m in self.client.machines()}
        return self._machines

    def legend(self, machine_id: str, full: bool) -> str:
        """fleet's "113f16a7.../10.0.0.2" form of a machine."""
        shown = machine_id if full else short_machine_id(machine_id)
        ip = self.machines().get(machine_id, {}).get("primaryIP", "")
        return f"{shown}/{ip}" if ip else shown

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


pass_session = click.make_pass_decorator(_Session)


@click.group(cls=_Group)
@click.option(
    "--endpoint",
    envvar="FLEETCTL_ENDPOINT",
    default=DEFAULT_ENDPOINT,
    show_default=True,
    help="fleetd API: unix:///path/fleet.sock or http(s)://HOST:PORT (env FLEETCTL_ENDPOINT)",
)
@click.option(
    "--token",
    envvar="FLEETCTL_TOKEN",
    default=None,
    help="bearer token for a TCP endpoint (env FLEETCTL_TOKEN)",
)
@click.option("--ca-file", envvar="FLEETCTL_CA_FILE", help="CA that signed fleetd's TLS certificate")
@click.option("--cert-file", envvar="FLEETCTL_CERT_FILE", help="client certificate for fleetd's mTLS")
@click.option("--key-file", envvar="FLEETCTL_KEY_FILE", help="key of --cert-file")
@click.option(
    "--request-timeout",
    envvar="FLEETCTL_REQUEST_TIMEOUT",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="seconds to wait for each API request",
)
@click.option(
    "--ssh-username",
    envvar="FLEETCTL_SSH_USERNAME",
    default="core",
    show_default=True,
    help="user for `fleetctl ssh` outside the local lab",
)
@click.version_option(__version__, prog_name="fleetctl")
@click.pass_context
def cli(
    ctx: click.Context,
    endpoint: str,
    token: str | None,
    ca_file: str | None,
    cert_file: str | None,
    key_file: str | None,
    request_timeout: float,
    ssh_username: str,
) -> None:
    """Manage units in a fleetpy cluster."""
    tls_files = {"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file}
    session = _Session(endpoint, token, request_timeout, ssh_username, tls_files)
    ctx.obj = session
    ctx.call_on_close(session.close)


def tabulate(rows: list[list[str]]) -> str:
    """Align columns as Go's tabwriter does for fleet (tab width 8, padding 1, tab padding)."""
    if not rows:
        return ""
    columns = max(len(row) for row in rows)
    widths = []
    for index in range(columns - 1):
        text = max(len(row[index]) for row in rows if len(row) > index + 1)
        widths.append(math.ceil((text + 1) / TAB_WIDTH) * TAB_WIDTH)
    lines = []
    for row in rows:
        cells = [
            cell + "\t" * math.ceil((widths[i] - len(cell)) / TAB_WIDTH) for i, cell in enumerate(row[:-1])
        ]
        lines.append("".join(cells) + row[-1])
    return "\n".join(lines) + "\n"


def _print_table(
    fields: str, known: dict[str, Callable[[Any], str]], items: Iterable[Any], legend: bool
) -> None:
    if not fields:
        raise click.ClickException("Must define output format")
    columns = fields.split(",")
    for column in columns:
        if column not in known:
            raise click.ClickException(
                f'Invalid key in output format: "{column}"; valid fields are {",".join(sorted(known))}'
            )
    rows = [[c.upper() for c in columns]] if legend else []
    rows += [[known[c](item) for c in columns] for item in items]
    click.echo(tabulate(rows), nl=False)


def _fields_option(default: str) -> Callable:
    return click.option(
        "--fields", default=default, show_default=True, help="comma-separated columns to print"
    )


# Listing
@cli.command("list-machines")
@click.option("-l", "--full", is_flag=True, help="do not ellipsize machine IDs")
@click.option("--no-legend", is_flag=True, help="do not print column headers")
@_fields_option("machine,ip,metadata")
@output_option
@pass_session
def list_machines(session: _Session, full: bool, no_legend: bool, fields: str, output: str) -> None:
    """List the machines in the cluster."""
    if structured(output):
        emit(list(session.machines().values()), output)
        return
    if output == "wide":
        full, fields = True, "machine,ip,metadata,state,cpus,memory,free,load"

    def metadata(m: dict) -> str:
        pairs = sorted(m.get("metadata", {}).items())
        text = ",".join(f"{k}={v}" for k, v in pairs)
        # A drained machine says so where fleet's columns have room for it.
        if m.get("cordoned"):
            return f"{text} (drained)" if text else "(drained)"
        return text or "-"

    known: dict[str, Callable[[dict], str]] = {
        "machine": lambda m: m["id"] if full else short_machine_id(m["id"]),
        "ip": lambda m: m.get("primaryIP") or "-",
        "metadata": metadata,
        "state": lambda m: "drained" if m.get("cordoned") else "schedulable",
        # fleetpy's: capacity and live facts (docs/resources.md); "-" from an older fleetd.
        "cpus": lambda m: _fact(m.get("capacity", {}).get("cpus"), lambda v: f"{v:g}"),
        "memory": lambda m: _fact(m.get("capacity", {}).get("memory"), format_bytes),
        "free": lambda m: _fact(m.get("facts", {}).get("memory_free"), format_bytes),
        "load": lambda m: _fact(m.get("facts", {}).get("load1"), lambda v: f"{v:.2f}"),
        "facts": lambda m: ",".join(f"{k}={v}" for k, v in sorted(m.get("facts", {}).items())) or "-",
    }
    _print_table(fields, known, session.machines().values(), not no_legend)


def _fact(value: object, show: Callable[[float], str]) -> str:
    return show(float(value)) if isinstance(value, int | float) else "-"


@cli.command("list-units")
@click.option("-l", "--full", is_flag=True, help="do not ellipsize fields")
@click.option("--no-legend", is_flag=True, help="do not print column headers")
@_fields_option("unit,machine,active,sub")
@output_option
@pass_session
def list_units(session: _Session, full: bool, no_legend: bool, fields: str, output: str) -> None:
    """List the state of units loaded onto machines, and units waiting for one.

    A unit that should run but reports no state shows "-"; the fleetpy field `reason` says
    why it is waiting (e.g. --fields unit,machine,active,reason), and `health` what its
    [X-Fleet] health check found (healthy, starting or unhealthy; "-" without a check).
    """
    client = session.client
    if output != "table":
        full, fields = True, "unit,machine,load,active,sub,health,hash,reason"
    states = client.unit_states()
    reported = {s["name"] for s in states}
    rows: list[dict] = [dict(s) for s in states]
    for unit in client.units():
        if unit["desiredState"] != "inactive" and unit["name"] not in reported:
            reason = client.pending_reason(unit["name"]) if "reason" in fields.split(",") else None
            rows.append({"name": unit["name"], "reason": reason})
    rows.sort(key=lambda r: (r["name"], r.get("machineID", "")))
    if structured(output):
        emit(rows, output)
        return

    def state(key: str) -> Callable[[dict], str]:
        return lambda r: r.get(key) or "-"

    known: dict[str, Callable[[dict], str]] = {
        "unit": lambda r: r["name"],
        "machine": lambda r: session.legend(r["machineID"], full) if r.get("machineID") else "-",
        "load": state("systemdLoadState"),
        "active": state("systemdActiveState"),
        "sub": state("systemdSubState"),
        "hash": lambda r: (r["hash"] if full else r["hash"][:7]) if r.get("hash") else "-",
        "health": health_text,
        "reason": state("reason"),
    }
    _print_table(fields, known, rows, not no_legend)


def health_text(state: dict) -> str:
    """A state record's health, as list-units and status show it: "unhealthy (restarts 2)"."""
    health = state.get("health")
    if not health:
        return "-"
    restarts = health.get("restarts", 0)
    return health["status"] + (f" (restarts {restarts})" if restarts else "")


@cli.command("list-unit-files")
@click.option("-l", "--full", is_flag=True, help="do not ellipsize fields")
@click.option("--no-legend", is_flag=True, help="do not print column headers")
@_fields_option("unit,hash,dstate,state,target")
@output_option
@pass_session
def list_unit_files(session: _Session, full: bool, no_legend: bool, fields: str, output: str) -> None:
    """List the units submitted to the cluster, whether or not they run anywhere."""
    if structured(output):
        emit(session.client.units(), output)
        return
    if output == "wide":
        full, fields = True, "unit,hash,dstate,state,target,global,desc"

    def target(u: dict) -> str:
        if u.get("global"):
            return "global"
        return session.legend(u["machineID"], full) if u.get("machineID") else "-"

    def digest(u: dict) -> str:
        value = fleet_unit.UnitFile.from_options(u["options"]).hash
        return value if full else value[:7]

    def description(u: dict) -> str:
        return next(
            (o["value"] for o in u["options"] if o["section"] == "Unit" and o["name"] == "Description"), "-"
        )

    known: dict[str, Callable[[dict], str]] = {
        "unit": lambda u: u["name"],
        "hash": digest,
        "dstate": lambda u: u.get("desiredState") or "-",
        "state": lambda u: "-" if u.get("global") else u.get("currentState") or "-",
        "target": target,
        "global": lambda u: str(bool(u.get("global"))).lower(),
        "desc": description,
    }
    _print_table(fields, known, session.client.units(), not no_legend)


# Reading units
@cli.command("cat")
@click.argument("unit", shell_complete=unit_names)
@pass_session
def cat(session: _Session, unit: str) -> None:
    """Print the unit file of a submitted unit."""
    name = fleet_unit.mangle_unit_name(unit)
    found = session.client.unit(name)
    if found is None:
        raise click.ClickException(f"Unit {name} not found")
    click.echo(fleet_unit.UnitFile.from_options(found["options"]).to_text(), nl=False)


@cli.command("explain")
@click.argument("units", nargs=-1, required=True, shell_complete=unit_names)
@pass_session
def explain(session: _Session, units: tuple[str, ...]) -> None:
    """Say why units run where they do, or why they run nowhere (fleetpy extension)."""
    for name in _existing(session.client, units):
        click.echo("\n".join(session.client.explain(name)))


@cli.command("plan")
@click.argument("units", nargs=-1, required=True, shell_complete=unit_names)
@pass_session
def plan(session: _Session, units: tuple[str, ...]) -> None:
    """Say where units would go if started now, and why, without starting them: each a local
    unit file, an instance of a local template, or a submitted unit (fleetpy extension)."""
    for arg in units:
        name = fleet_unit.mangle_unit_name(arg)
        parsed = fleet_unit.UnitName.parse(name)
        options = _local_options(arg)
        if options is None and parsed.is_instance:
            options = _local_options(os.path.join(os.path.dirname(arg), parsed.template))
        click.echo("\n".join(session.client.plan(name, options)))


@cli.command("ssh", context_settings={"ignore_unknown_options": True})
@click.argument("target")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@pass_session
def ssh(session: _Session, target: str, command: tuple[str, ...]) -> None:
    """Open a shell (or run COMMAND) on machine TARGET (an id or unique prefix) or on the
    machine running unit TARGET, with `ssh USER@IP` like fleet (--ssh-username, default core).
    In a local lab, `fleetpy lab shell TARGET` enters a node instead."""
    import ipaddress  # only here: every command pays for fleetctl's top-level imports
    import shutil

    machine = _target_machine(session.client, target)
    try:
        address = str(ipaddress.ip_address(machine.get("primaryIP", "")))
    except ValueError:
        raise click.ClickException(
            f"machine {machine['id']} has no usable IP address ({machine.get('primaryIP')!r})"
        ) from None
    if shutil.which("ssh") is None:
        raise click.ClickException(
            "no ssh client: apt-get install -y openssh-client (in a local lab: `fleetpy lab shell TARGET`)"
        )
    os.execvp("ssh", ["ssh", "-l", session.ssh_username, "--", address, *command])


@cli.command("drain")
@click.argument("machine", shell_complete=machine_ids)
@click.option("--no-block", is_flag=True, help="do not wait for the units to move")
@click.option(
    "--block-attempts",
    default=DEFAULT_BLOCK_ATTEMPTS,
    show_default=True,
    type=click.IntRange(min=0),
    help="polls (0.2 s apart) to wait for the units to move; 0 waits forever",
)
@pass_session
def drain(session: _Session, machine: str, no_block: bool, block_attempts: int) -> None:
    """Keep new units off MACHINE (an id or unique prefix) and move its units elsewhere, each
    new copy started before the old one stops (fleetpy extension; undo with `uncordon`)."""
    client = session.client
    machine_id = _machine_id(client, machine)
    # Global units stay: they run on every machine that fits, drained or not.
    moving = sorted(
        u["name"] for u in client.units() if u.get("machineID") == machine_id and not u.get("global")
    )
    client.set_cordon(machine_id, True)
    if not no_block:
        late = _poll(moving, lambda left: _moved_off(session, machine_id, left), block_attempts)
        if late:
            raise click.ClickException(
                f"timed out waiting for {', '.join(late)} to leave machine {short_machine_id(machine_id)}"
            )
    click.echo(f"Machine {session.legend(machine_id, False)} drained")
    # A drain never copies data: the units of a local volume living here wait for it.
    for volume in client.volumes():
        if volume["machineID"] == machine_id:
            click.echo(
                f"Volume {volume['name']} lives on this machine: its units wait for it; move it with "
                f"'fleetctl volume move {volume['name']} MACHINE', or 'fleetctl uncordon "
                f"{short_machine_id(machine_id).rstrip('.')}' to run them here again"
            )


def _moved_off(session: _Session, machine_id: str, names: list[str]) -> set[str]:
    """Those of `names` whose copy on `machine_id` is gone, reporting where each went."""
    on_it = {s["name"] for s in session.client.unit_states(machine_id=machine_id)}
    done = set()
    for name, unit in session.client.many_units([n for n in names if n not in on_it]).items():
        if unit is None:
            done.add(name)  # destroyed meanwhile
            continue
        where = unit.get("machineID")
        if where and where != machine_id and unit["currentState"] == unit["desiredState"]:
            click.echo(f"Unit {name} moved to {session.legend(where, False)}")
            done.add(name)
        elif not where:
            reason = session.client.pending_reason(name)
            click.echo(f"Unit {name} waiting for a machine" + (f": {reason}" if reason else ""))
            done.add(name)
    return done


@cli.command("list-volumes")
@click.option("--full", "-l", is_flag=True, help="show full machine IDs")
@click.option("--no-legend", is_flag=True, help="do not print column headers")
@pass_session
def list_volumes(session: _Session, full: bool, no_legend: bool) -> None:
    """List volumes: local ones with the machine each lives on and its last move, shared ones
    with the units that use them (fleetpy extension)."""
    rows = [] if no_legend else [["VOLUME", "DRIVER", "MACHINE", "MOVE", "UNITS"]]
    rows += [
        [
            v["name"],
            v.get("driver", "local"),  # an older fleetd knew local volumes only
            # A shared volume is on every machine's shared volume directory.
            "-" if v["machineID"] is None else session.legend(v["machineID"], full),
            _move_text(v["move"], full),
            ",".join(v.get("units") or ["-"]),
        ]
        for v in session.client.volumes()
    ]
    click.echo(tabulate(rows), nl=False)


def _move_text(move: dict | None, full: bool) -> str:
    """A volume's last move, for list-volumes: where it stands, or how it ended."""
    if move is None:
        return "-"
    source = move["source"] if full else short_machine_id(move["source"])
    target = move["target"] if full else short_machine_id(move["target"])
    if move["state"] == "done":
        return f"moved from {source} in {move['finished'] - move['started']:.1f}s"
    if move["state"] == "failed":
        return f"move to {target} failed: {move.get('reason', '')}"
    return f"{move['state']}: {source} -> {target}"


@cli.group("volume")
def volume() -> None:
    """Local volumes ([X-Fleet] Volume=; fleetpy extension)."""


@volume.command("move")
@click.argument("name")
@click.argument("machine")
@click.option("--timeout", default=600.0, show_default=True, help="seconds to wait for the move to end")
@pass_session
def volume_move(session: _Session, name: str, machine: str, timeout: float) -> None:
    """Move local volume NAME to MACHINE (an id or unique prefix): its units stop, its data is
    copied there, and they start there with it. Waits for the end and shows each step."""
    client = session.client
    target = _machine_id(client, machine)
    reply = client.move_volume(name, target)
    if not reply["started"]:
        click.echo(f"Volume {name} already lives on {session.legend(target, False)}; nothing to move")
        return
    started = reply["move"]["started"]
    source = session.legend(reply["move"]["source"], False)
    click.echo(f"Moving volume {name} from {source} to {session.legend(target, False)}")
    said = 0  # of MOVE_STEPS: each is shown once the move reached it, even if a poll missed it
    deadline = time.monotonic() + timeout
    move = reply["move"]
    while True:
        if move is None or move["started"] != started:
            raise click.ClickException(f"volume {name}'s move was replaced by another one")
        state = move["state"]
        reached = max(said, _steps_reached(state))
        for _, text in MOVE_STEPS[said:reached]:
            click.echo(text.format(source=source))
        said = reached
        if state == "done":
            took = move["finished"] - move["started"]
            click.echo(
                f"Volume {name} moved to {session.legend(target, False)} in {took:.1f}s "
                f"({format_bytes(move.get('bytes', 0))}); its units start there"
            )
            return
        if state == "failed":
            raise click.ClickException(
                f"moving volume {name} failed: {move.get('reason', 'no reason given')}; "
                f"it stays on {source}, and its units start there again"
            )
        if time.monotonic() > deadline:
            raise click.ClickException(
                f"volume {name} is still {state} after {timeout:g}s; follow it with 'fleetctl list-volumes'"
            )
        time.sleep(POLL_INTERVAL)
        move = client.volume(name)["move"]


# What `volume move` prints as its move reaches each state, in their order.
MOVE_STEPS = (
    ("stopping", "Stopping the units using it on {source}"),
    ("copying", "Copying its data from {source}"),
)


def _steps_reached(state: str) -> int:
    """How many of MOVE_STEPS a move in `state` has reached (none for a failed one)."""
    names = [step for step, _ in MOVE_STEPS]
    if state == "done":
        return len(names)
    return names.index(state) + 1 if state in names else 0


@volume.command("rm")
@click.argument("name")
@pass_session
def volume_rm(session: _Session, name: str) -> None:
    """Forget where volume NAME lives, so its units can start afresh on another machine. Its
    data stays on the old machine's disk; a unit already running with it keeps running."""
    session.client.forget_volume(name)
    click.echo(f"Volume {name} forgotten")


@cli.command("uncordon")
@click.argument("machine", shell_complete=machine_ids)
@pass_session
def uncordon(session: _Session, machine: str) -> None:
    """Let a drained MACHINE take units again (fleetpy extension). Units that moved away stay
    where they are."""
    machine_id = _machine_id(session.client, machine)
    session.client.set_cordon(machine_id, False)
    click.echo(f"Machine {session.legend(machine_id, False)} takes units again")


def _machine_id(client: Client, target: str) -> str:
    matches = [m["id"] for m in client.machines() if m["id"].startswith(target)]
    if len(matches) != 1:
        raise click.ClickException(f"{len(matches)} machines match {target!r}; give a longer id")
    return matches[0]


def _target_machine(client: Client, target: str) -> dict:
    machines = client.machines()
    if "." in target:  # machine ids are hex; unit names always have a type suffix
        unit = client.unit(fleet_unit.mangle_unit_name(target))
        if unit is None or not unit.get("machineID"):
            raise click.ClickException(f"unit {target} is not running on any machine")
        target = unit["machineID"]
    matches = [m for m in machines if m["id"].startswith(target)]
    if len(matches) != 1:
        raise click.ClickException(
            f"{len(matches)} machines match {target!r}; give a longer id or a unit name"
        )
    return matches[0]


@cli.command("status")
@click.argument("units", nargs=-1, required=True, shell_complete=unit_names)
@output_option
@pass_session
def status(session: _Session, units: tuple[str, ...], output: str) -> None:
    """Show systemctl status of units, from the machines running them, then their recent events."""
    names = _expand(session.client, units)
    records = []
    for index, name in enumerate(names):
        text = session.client.unit_status(name)
        recent = session.client.events(unit=name, limit=STATUS_EVENTS)
        if structured(output):
            states = session.client.unit_states(unit_name=name)
            records.append({"name": name, "states": states, "status": text, "events": recent})
            continue
        if index:
            click.echo()
        click.echo(text, nl=False)
        for state in session.client.unit_states(unit_name=name):
            if state.get("health"):
                found = state["health"]
                said = f": {found['message']}" if found.get("message") else ""
                click.echo(
                    f"\nHealth: {health_text(state)}, {found.get('failures', 0)} failed checks in a row{said}"
                )
        click.echo("\nEvents:")
        click.echo("\n".join(f"  {line}" for line in event_lines(recent)) if recent else "  <none>")
    if structured(output):
        emit(records, output)


@cli.command("journal")
@click.option(
    "--lines",
    default=10,
    show_default=True,
    type=click.IntRange(min=0),
    help="number of recent journal lines",
)
@click.option("-f", "--follow", is_flag=True, help="keep printing new lines as they arrive")
@click.argument("unit", shell_complete=unit_names)
@pass_session
def journal(session: _Session, lines: int, follow: bool, unit: str) -> None:
    """Print the journal of a unit, from the machine running it."""
    for line in session.client.unit_journal(fleet_unit.mangle_unit_name(unit), lines, follow):
        click.echo(line)


# Changing units
def _block_options(command: Callable) -> Callable:
    command = click.option("--no-block", is_flag=True, help="do not wait for the units to reach their state")(
        command
    )
    return click.option(
        "--block-attempts",
        default=DEFAULT_BLOCK_ATTEMPTS,
        show_default=True,
        type=click.IntRange(min=0),
        help=f"wait up to this many times {POLL_INTERVAL}s for the state, as fleet's attempts (0 = forever)",
    )(command)


@cli.command("submit")
@click.argument("unit_files", nargs=-1, required=True)
@pass_session
def submit(session: _Session, unit_files: tuple[str, ...]) -> None:
    """Upload unit files to the cluster without scheduling them."""
    _create_units(session.client, unit_files, replace=False)


@cli.command("load")
@click.option("--replace", is_flag=True, help="replace units whose local file differs")
@_block_options
@click.argument("units", nargs=-1, required=True, shell_complete=unit_names)
@pass_session
def load(
    session: _Session, units: tuple[str, ...], replace: bool, no_block: bool, block_attempts: int
) -> None:
    """Schedule units onto machines and load them into systemd there, without starting them."""
    names, known = _create_units(session.client, units, replace, "loaded")
    _change_state(session, names, "loaded", no_block, block_attempts, known)


@cli.command("start")
@click.option("--replace", is_flag=True, help="replace units whose local file differs")
@_block_options
@click.argument("units", nargs=-1, required=True, shell_complete=unit_names)
@pass_session
def start(
    session: _Session, units: tuple[str, ...], replace: bool, no_block: bool, block_attempts: int
) -> None:
    """Schedule and start units, submitting local unit files first if needed."""
    names, known = _create_units(session.client, units, replace, "launched")
    _change_state(session, names, "launched", no_block, block_attempts, known)


@cli.command("stop")
@_block_options
@click.argument("units", nargs=-1, required=True, shell_complete=unit_names)
@pass_session
def stop(session: _Session, units: tuple[str, ...], no_block: bool, block_attempts: int) -> None:
    """Stop units; they stay loaded on their machines."""
    _change_state(session, _existing(session.client, units), "loaded", no_block, block_attempts)


@cli.command("unload")
@_block_options
@click.argument("units", nargs=-1, required=True, shell_complete=unit_names)
@pass_session
def unload(session: _Session, units: tuple[str, ...], no_block: bool, block_attempts: int) -> None:
    """Unload units from their machines; they stay submitted."""
    _change_state(session, _existing(session.client, units), "inactive", no_block, block_attempts)


@cli.command("destroy")
@_block_options
@click.argument("units", nargs=-1, required=True, shell_complete=unit_names)
@pass_session
def destroy(session: _Session, units: tuple[str, ...], no_block: bool, block_attempts: int) -> None:
    """Remove units from the cluster altogether."""
    _destroy(session.client, _expand(session.client, units), no_block, block_attempts)


def _destroy(client: Client, names: Iterable[str], no_block: bool, block_attempts: int) -> None:
    destroyed = []
    for name in names:
        try:
            client.destroy_unit(name)
        except APIError as error:
            if error.code != 404:
                raise
            click.echo(f"Unit {name} does not exist", err=True)
            continue
        destroyed.append(name)
        click.echo(f"Destroyed {name}")
    if no_block:
        return

    def gone(left: list[str]) -> set[str]:
        return set(left) - {state["name"] for state in client.unit_states()}

    late = _poll(destroyed, gone, block_attempts)
    if late:
        raise click.ClickException(
            "; ".join(f"timed out waiting for unit {n} to be removed from its machine" for n in late)
        )


@cli.command("scale")
@_block_options
@click.argument("targets", nargs=-1, required=True)
@pass_session
def scale(session: _Session, targets: tuple[str, ...], no_block: bool, block_attempts: int) -> None:
    """Run COUNT instances of a template, TEMPLATE=COUNT such as web@.service=5: start
    web@1..5, creating those missing, and destroy the rest, highest numbers first; a local
    template file is submitted first (fleetpy extension)."""
    client = session.client
    for target in targets:
        arg, equals, count = target.rpartition("=")
        if not equals or not count.isdigit():
            raise click.ClickException(f"{target!r}: give TEMPLATE=COUNT, such as web@.service=5")
        template = fleet_unit.UnitName.parse(fleet_unit.mangle_unit_name(arg))
        if not template.is_template:
            raise click.ClickException(f"{template.full} is not a template; scale one such as web@.service")
        if os.path.isfile(arg):
            _create_units(client, [arg], replace=False)
        wanted, surplus = scale_steps(template, [u["name"] for u in client.units()], int(count))
        _destroy(client, surplus, no_block, block_attempts)
        if wanted:
            # Instances take the submitted template; created launched, they need no other request.
            _, known = _create_units(client, wanted, replace=False, desired="launched")
            _change_state(session, wanted, "launched", no_block, block_attempts, known)


@cli.command("rolling-replace")
@click.argument("template_file")
@click.option(
    "--max-unavailable",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="instances replaced at once (each is down while it restarts)",
)
@click.option(
    "--timeout",
    default=120.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="seconds a batch may take to be active and healthy before the run stops",
)
@click.option(
    "--no-rollback", is_flag=True, help="on failure, leave the replaced instances on the new content"
)
@pass_session
def rolling_replace(
    session: _Session, template_file: str, max_unavailable: int, timeout: float, no_rollback: bool
) -> None:
    """Give every instance of a template the content of TEMPLATE_FILE (a local web@.service),
    a batch at a time, each batch active and healthy before the next; on failure stop and roll
    back the replaced instances (fleetpy extension)."""
    from fleetpy.cli.rolling import RollingReplace

    template = fleet_unit.UnitName.parse(fleet_unit.mangle_unit_name(template_file))
    if not template.is_template:
        raise click.ClickException(f"{template.full} is not a template; give one such as web@.service")
    options = _local_options(template_file)
    if options is None:
        raise click.ClickException(f"{template_file}: no such file; give the new template's unit file")
    run = RollingReplace(
        session.client, template.full, options, timeout, lambda machine: session.legend(machine, False)
    )
    run.run(max_unavailable, rollback=not no_rollback)


def scale_steps(
    template: fleet_unit.UnitName, names: Iterable[str], count: int
) -> tuple[list[str], list[str]]:
    """The instances of `template` to run for `count` (those numbered now, lowest first, then
    the lowest free numbers) and those to destroy (the highest numbers). Instances not named
    by a number are left alone."""
    numbers = set()
    for name in names:
        parsed = fleet_unit.UnitName.parse(name)
        if parsed.template == template.full and parsed.instance.isdigit() and parsed.instance[0] != "0":
            numbers.add(int(parsed.instance))
    ordered = sorted(numbers)
    keep, surplus = ordered[:count], ordered[count:]
    free = (n for n in range(1, count + len(ordered) + 1) if n not in numbers)
    keep += [next(free) for _ in range(count - len(keep))]

    def name(number: int) -> str:
        return f"{template.prefix}@{number}.{template.suffix}"

    return [name(n) for n in sorted(keep)], [name(n) for n in reversed(surplus)]


def _expand(client: Client, args: Iterable[str]) -> list[str]:
    """Unit names for the arguments; glob patterns match units already submitted."""
    names: list[str] = []
    submitted: list[str] | None = None
    for arg in args:
        if _GLOB_CHARS & set(arg):
            if submitted is None:
                submitted = [u["name"] for u in client.units()]
            from fleetpy.unit.glob import BadPattern, glob_match

            try:
                matched = [n for n in submitted if glob_match(os.path.basename(arg), n)]
            except BadPattern as error:
                raise click.ClickException(str(error)) from None
            if not matched:
                raise click.ClickException(f"no submitted unit matches {arg}")
            names.extend(matched)
        else:
            names.append(fleet_unit.mangle_unit_name(arg))
    return list(dict.fromkeys(names))


def _existing(client: Client, args: Iterable[str]) -> list[str]:
    names = _expand(client, args)
    missing = [n for n, unit in client.many_units(names).items() if unit is None]
    if missing:
        raise click.ClickException(f"unable to find unit {', '.join(missing)}; submit it first")
    return names


def _local_options(path: str) -> list[dict] | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        options = fleet_unit.UnitFile.parse(text).to_options()
    except fleet_unit.UnitError as error:
        raise click.ClickException(f"{path}: {error}") from None
    from fleetpy.unit.syntax import swallowed_by_comments

    for lineno, line in swallowed_by_comments(text):
        click.echo(
            f"WARNING: {path}:{lineno}: {line!r} follows a comment ending in a backslash; fleet "
            "read it as part of the comment, systemd and fleetpy run it",
            err=True,
        )
    return options


def _hash(options: list[dict]) -> str:
    return fleet_unit.UnitFile.from_options(options).hash


def _create_units(
    client: Client, args: Iterable[str], replace: bool, desired: str = "inactive"
) -> tuple[list[str], dict[str, dict]]:
    """Submit what is not in the registry yet (fleet's lazy create); all names, and the units
    whose state is known now (as fleetd has them, or as just created), by name.

    New units are created in `desired` state at once (templates: inactive), where Go fleetctl
    creates them inactive and then sets the state: the same result with one request less."""
    names = []
    given: dict[str, str] = {}
    for arg in args:
        if _GLOB_CHARS & set(arg):
            names.extend(_expand(client, [arg]))
            continue
        name = fleet_unit.mangle_unit_name(arg)
        fleet_unit.UnitName.parse(name)
        names.append(name)
        given.setdefault(name, arg)
    registered = client.many_units(given)
    known = {name: unit for name, unit in registered.items() if unit is not None}
    created = []
    for name, arg in given.items():
        local = _local_options(arg)
        existing = registered[name]
        if existing is not None:
            if local is None or _hash(local) == _hash(existing["options"]):
                continue
            if not replace:
                click.echo(
                    f"WARNING: Unit {name} in registry differs from local unit file {arg}; "
                    "use --replace to replace it",
                    err=True,
                )
                continue
            client.destroy_unit(name)
            del known[name]
        options = local or _template_options(name, arg)
        state = "inactive" if fleet_unit.UnitName.parse(name).is_template else desired
        parsed = _checked_options(name, options) if options else None
        if parsed is not None:
            known[name] = {"name": name, "desiredState": state, "global": parsed.is_global}
        created.append((name, state, options))
    client.create_units(created)
    return list(dict.fromkeys(names)), known


def _checked_options(name: str, options: list[dict]) -> fleet_unit.FleetOptions | None:
    """The unit's [X-Fleet] options, after warning about deprecated ones; None if fleetd will
    refuse them (it says why)."""
    try:
        parsed = fleet_unit.parse_fleet_options(name, fleet_unit.UnitFile.from_options(options))
    except fleet_unit.UnitError:
        return None
    for warning in parsed.warnings:
        click.echo(f"WARNING: {warning}", err=True)
    return parsed


def _template_options(name: str, arg: str) -> list[dict] | None:
    """An instance's options from a local template file beside `arg`; None to let fleetd use
    the submitted template (it answers 404 when there is none)."""
    parsed = fleet_unit.UnitName.parse(name)
    if not parsed.is_instance:
        raise click.ClickException(f"unable to find unit file {arg} locally or unit {name} in the cluster")
    return _local_options(os.path.join(os.path.dirname(arg), parsed.template))


def _change_state(
    session: _Session,
    names: list[str],
    target: str,
    no_block: bool,
    attempts: int,
    known: dict[str, dict] | None = None,
) -> None:
    """Set the units' desired state and wait for it; `known`: units already read (or just
    created) by this command, not asked for again."""
    client = session.client
    known = known or {}
    units = {**client.many_units([n for n in names if n not in known]), **known}
    units = {name: units[name] for name in names}
    for name, unit in units.items():
        if unit is None:
            raise click.ClickException(f"unable to find unit {name}")
        if fleet_unit.UnitName.parse(name).is_template and target != "inactive":
            raise click.ClickException(
                f"unable to {'start' if target == 'launched' else 'load'} "
                f"{name}: it is a template; use an instance such as "
                f"{name.replace('@.', '@1.')}"
            )
    client.set_target_states([n for n, u in units.items() if u["desiredState"] != target], target)
    if no_block:
        return
    # As fleet does, global units are not waited for: they have no single machine to report.
    waited = [n for n, u in units.items() if not u.get("global")]

    arrivals = _Arrivals(session, target)
    late = _wait(waited, arrivals, attempts * POLL_INTERVAL)
    problems = [f"unit {name} failed to start: {reason}" for name, reason in arrivals.failed.items()]
    if late or problems:
        for name in late:
            reason = client.pending_reason(name)
            problems.append(
                f"timed out waiting for unit {name} to report state {target}"
                + (f" (pending: {reason})" if reason else "")
            )
        raise click.ClickException("; ".join(problems))


class _Arrivals:
    """Which units of a blocking command got to the target state, or failed on the way there."""

    def __init__(self, session: _Session, target: str):
        self.session = session
        self.target = target
        self.failed: dict[str, str] = {}
        self._started: dict[str, float] = {}

    def __call__(self, left: list[str], timeout: float) -> set[str]:
        answer = self.session.client.wait_units(left, self.target, timeout)
        now = time.monotonic()
        done: set[str] = set()
        # A unit that failed or cannot load is done waiting: say systemd's reason, not "launched".
        if self.target == "launched":
            self.failed.update(answer["failed"])
            done |= answer["failed"].keys()
        settling = []
        for unit in answer["units"]:
            name = unit["name"]
            if name in done or unit["currentState"] != self.target:
                continue
            # A unit that fails at once is active for a moment first: watch it a little longer.
            if self.target == "launched" and now - self._started.setdefault(name, now) < STARTUP_GRACE:
                settling.append(self._started[name] + STARTUP_GRACE - now)
                continue
            where = unit.get("machineID")
            shown = f" on {self.session.legend(where, False)}" if where else ""
            click.echo(f"Unit {name} {self.target}{shown}")
            done.add(name)
        if settling and len(done) + len(settling) == len(left):
            time.sleep(min(settling))  # fleetd would answer at once: nothing else to wait for
        return done


def _wait(names: list[str], done: Callable[[list[str], float], set[str]], seconds: float) -> list[str]:
    """Long-poll until every name is done or `seconds` passed (0 = forever); the rest."""
    left = list(names)
    until = time.monotonic() + seconds
    progress = Progress(len(names), "done")
    while left:
        slice_ = WAIT_SLICE if not seconds else min(WAIT_SLICE, until - time.monotonic())
        progress.clear()
        finished = done(left, max(slice_, 0.0))
        left = [n for n in left if n not in finished]
        progress.update(len(left))
        if seconds and time.monotonic() >= until:
            break
    progress.clear()
    return left


def _poll(names: list[str], done: Callable[[list[str]], set[str]], attempts: int) -> list[str]:
    """Ask which names are done until all are or attempts run out (0 = forever); the rest."""
    left = list(names)
    attempt = 0
    progress = Progress(len(names), "done")
    while left:
        progress.clear()
        finished = done(left)
        left = [n for n in left if n not in finished]
        progress.update(len(left))
        attempt += 1
        if not left or (attempts and attempt >= attempts):
            break
        time.sleep(POLL_INTERVAL)
    progress.clear()
    return left


cli.add_command(events_command)


def main() -> None:
    cli(prog_name="fleetctl")


if __name__ == "__main__":
    main()
