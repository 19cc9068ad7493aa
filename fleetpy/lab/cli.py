"""`fleetpy lab ...`: bring a local multi-node lab up and down, and break it on purpose."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from fleetpy.cli.output import emit, output_option, structured
from fleetpy.conf.values import BadValue, parse_metadata, short_machine_id
from fleetpy.lab.lab import DEFAULT_DIR, Lab, LabError
from fleetpy.lab.node import NodeError
from fleetpy.registry import StoreError

DIR_OPTION = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="FLEETPY_LAB_DIR",
    default=DEFAULT_DIR,
    show_default=True,
    help="lab directory (state, logs, sockets); keep it short: unix socket paths are limited",
)


def _lab_command(name: str, **kwargs: Any) -> Callable[[Callable[..., None]], click.Command]:
    """A lab subcommand run under the lab's lock, with LabError shown as a message, not a traceback."""

    def decorate(function: Callable[..., None]) -> click.Command:
        def run(directory: Path, **params: Any) -> None:
            lab = Lab(directory)
            try:
                with lab.locked():
                    function(lab, **params)
            except (LabError, NodeError) as error:
                raise click.ClickException(str(error)) from None

        run.__doc__ = function.__doc__
        run.__name__ = function.__name__
        # The command's own click options and arguments, in the order they were written.
        run.__click_params__ = getattr(function, "__click_params__", [])  # type: ignore[attr-defined]
        return group.command(name, **kwargs)(DIR_OPTION(run))

    return decorate


@click.group("lab")
def group() -> None:
    """A local multi-node fleet lab: one etcd cluster, N nodes with systemd --user and fleetd."""


def _parse_metadata(values: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """`NODE=key=value[,key=value]` options -> {NODE: metadata}, each read as fleetd reads metadata."""
    result: dict[str, dict[str, str]] = {}
    for value in values:
        node, sep, pairs = value.partition("=")
        if not sep or not pairs:
            raise click.BadParameter(f"{value!r}: use NODE=key=value[,key=value]", param_hint="--metadata")
        try:
            result.setdefault(node, {}).update(parse_metadata(pairs))
        except BadValue as error:
            raise click.BadParameter(f"{value!r}: {error}", param_hint="--metadata") from None
    return result


@_lab_command("up")
@click.option("--nodes", "node_count", type=click.IntRange(1, 200), default=3, show_default=True)
@click.option("--etcd-members", type=click.Choice(["1", "3", "5"]), default="1", show_default=True)
@click.option(
    "--etcd-api",
    type=click.Choice(["v3", "v2"]),
    default="v3",
    show_default=True,
    help="the etcd API the fleetds use; v2 also turns etcd's v2 API on (off otherwise)",
)
@click.option("--metadata", multiple=True, help="NODE=key=value[,key=value], e.g. node1=role=db; repeatable")
@click.option(
    "--user-data",
    type=click.Path(exists=True, dir_okay=False),
    help="cloud-config: one node per member of its coreos.etcd2.initial-cluster (name, address), "
    "configured only by applying the file inside it; no lab etcd, no lab fleetd",
)
@click.option(
    "--network",
    type=click.Choice(["auto", "netns", "loopback"]),
    default="auto",
    show_default=True,
    help="netns: own namespace per node, addresses in a free 10.251.N.0/24 on a bridge of the lab's own; "
    "loopback: shared network, 127.0.0.x",
)
@click.option(
    "--agent-ttl",
    default="10s",
    show_default=True,
    help="fleetd machine TTL (how fast a dead node is noticed)",
)
@click.option(
    "--containers/--no-containers",
    default=None,
    help="make nodes ready for podman units (default: when podman is installed)",
)
@click.option(
    "--metrics",
    "serve_metrics",
    is_flag=True,
    help="serve every node's metrics, labelled by node, on 127.0.0.1 for Prometheus (behind the lab's token)",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="port of --metrics on 127.0.0.1; 0: a free one (kept across `up`s of this lab)",
)
def up(
    lab: Lab,
    node_count: int,
    etcd_members: str,
    etcd_api: str,
    metadata: tuple[str, ...],
    user_data: str | None,
    network: str,
    agent_ttl: str,
    containers: bool | None,
    serve_metrics: bool,
    metrics_port: int,
) -> None:
    """Start etcd and the nodes, wait until every machine is registered; idempotent."""
    started = time.monotonic()
    notes = lab.up(
        node_count=node_count,
        etcd_members=int(etcd_members),
        metadata=_parse_metadata(metadata),
        network=network,
        agent_ttl=agent_ttl,
        user_data=user_data,
        containers=containers,
        etcd_api=etcd_api,
    )
    if serve_metrics or (lab.state and lab.state.metrics_url):  # asked for now, or before: repaired
        lab.serve_metrics(metrics_port)
    for note in notes:
        click.echo(f"note: {note}")
    _print_status(lab.status())
    click.echo(f"lab up in {time.monotonic() - started:.1f}s")
    click.echo(f"export FLEETCTL_ENDPOINT={lab.endpoint()}")


@_lab_command("status")
@output_option
@click.option("--json", "as_json", is_flag=True, help="the same as -o json")
def status(lab: Lab, output: str, as_json: bool) -> None:
    """Nodes, processes, health, memory."""
    info = lab.status()
    if as_json or structured(output):
        emit(info, "json" if as_json else output)
    else:
        _print_status(info, wide=output == "wide")


@_lab_command("metrics")
def metrics(lab: Lab) -> None:
    """Every node's Prometheus metrics in one text, each sample labelled with its node."""
    from fleetpy.lab.metrics import scrape

    click.echo(scrape(lab.book), nl=False)


@_lab_command("down")
def down(lab: Lab) -> None:
    """Stop every process the lab started and remove its namespaces, links and cgroups."""
    notes = lab.down() or [f"no lab in {lab.dir}; nothing to do"]
    for note in notes:
        click.echo(note)


@_lab_command("shell", context_settings={"ignore_unknown_options": True})
@click.argument("target", shell_complete=lambda ctx, _param, word: _complete_nodes(ctx, word, units=True))
@click.argument("command", nargs=-1)
def shell(lab: Lab, target: str, command: tuple[str, ...]) -> None:
    """A shell (or COMMAND) inside node TARGET, or inside the node running unit TARGET."""
    node = lab.node(_resolve_node(lab, target))
    argv = list(command) or [os.environ.get("SHELL", "/bin/bash")]
    env = {"PS1": f"[{node.name} \\W]# ", "FLEETCTL_ENDPOINT": f"unix://{node.dir / 'fleet.sock'}"}
    proc = node.popen(argv, env_extra=env)
    sys.exit(proc.wait())


@_lab_command("kill-node")
@click.argument("node", shell_complete=lambda ctx, _param, word: _complete_nodes(ctx, word))
def kill_node(lab: Lab, node: str) -> None:
    """Kill every process of NODE at once (systemd, fleetd, units), like a power cut."""
    lab.kill_node(node)
    click.echo(f"{node} killed")


@_lab_command("restart-node")
@click.argument("node", shell_complete=lambda ctx, _param, word: _complete_nodes(ctx, word))
def restart_node(lab: Lab, node: str) -> None:
    """Kill NODE if it runs, start it again (same machine-id) and wait until it registers."""
    lab.restart_node(node)
    click.echo(f"{node} restarted")


@_lab_command("partition")
@click.argument("node", shell_complete=lambda ctx, _param, word: _complete_nodes(ctx, word))
def partition(lab: Lab, node: str) -> None:
    """Cut NODE off the lab network (its veth goes down): no etcd, no peers."""
    lab.partition(node)
    click.echo(f"{node} partitioned")


@_lab_command("heal")
@click.argument("node", shell_complete=lambda ctx, _param, word: _complete_nodes(ctx, word))
def heal(lab: Lab, node: str) -> None:
    """Reconnect a partitioned NODE."""
    lab.heal(node)
    click.echo(f"{node} healed")


@_lab_command("etcd-kill")
@click.argument("member", shell_complete=lambda ctx, _param, word: _complete_members(ctx, word))
def etcd_kill(lab: Lab, member: str) -> None:
    """SIGKILL etcd MEMBER, given by index (0, 1, 2) or name (etcd0, ...)."""
    click.echo(f"{lab.etcd_kill(member)} killed")


@_lab_command("etcd-start")
@click.argument("member", shell_complete=lambda ctx, _param, word: _complete_members(ctx, word))
def etcd_start(lab: Lab, member: str) -> None:
    """Start a killed etcd MEMBER again on its data dir."""
    click.echo(f"{lab.etcd_start(member)} running")


def _completing_lab(ctx: click.Context) -> Lab | None:
    try:
        lab = Lab(ctx.params.get("directory") or os.environ.get("FLEETPY_LAB_DIR") or DEFAULT_DIR)
        return lab if lab.state is not None else None
    except Exception:  # noqa: BLE001 - completion must never print a traceback into a shell
        return None


def _complete_nodes(ctx: click.Context, word: str, units: bool = False) -> list[str]:
    """Shell completion: the lab's nodes (from its state file) and, with `units`, its units (fleetd)."""
    lab = _completing_lab(ctx)
    if lab is None or lab.state is None:
        return []
    names = [n.name for n in lab.state.nodes]
    if units:
        from fleetpy.client import Client

        try:
            with Client(lab.endpoint(), timeout=2.0) as client:
                names += [u["name"] for u in client.units()]
        except Exception:  # noqa: BLE001 - fleetd away: offer the nodes alone
            pass
    return [name for name in names if name.startswith(word)]


def _complete_members(ctx: click.Context, word: str) -> list[str]:
    lab = _completing_lab(ctx)
    members = [m.name for m in lab.state.etcd] if lab and lab.state else []
    return [name for name in members if name.startswith(word)]


def _resolve_node(lab: Lab, target: str) -> str:
    """A node name as is; a unit name becomes the node its machine runs it on."""
    state = lab.state
    if state is None:
        raise LabError(f"no lab in {lab.dir}; start one with `fleetpy lab up`")
    if any(n.name == target for n in state.nodes):
        return target
    try:
        assignments = [a for a in lab.read(lambda r: r.assignments(), retry_for=2.0) if a.unit == target]
    except StoreError as error:
        raise LabError(f"{target} is not a node, and etcd cannot say where it runs: {error}") from None
    by_machine = {n.machine_id: n.name for n in state.nodes}
    for assignment in assignments:
        if assignment.machine_id in by_machine:
            return by_machine[assignment.machine_id]
    raise LabError(
        f"{target} is neither a node ({', '.join(n.name for n in state.nodes)}) nor a scheduled unit"
    )


def _print_status(info: dict[str, Any], wide: bool = False) -> None:
    def yes(flag: bool) -> str:
        return "up" if flag else "DOWN"

    def registered(flag: bool) -> str:
        # Without a quorum the registry cannot be read: whether a machine is in it is unknown.
        return "?" if not info["etcd_quorum"]["ok"] else "yes" if flag else "no"

    click.echo(
        f"lab {info['dir']}  network: {info['network']}"
        + (f" (bridge {info['bridge']})" if info["bridge"] else "")
        + f"  containers: {'podman' if info['containers'] else 'off'}"
    )
    if info["metrics"]:
        click.echo(f"  metrics  {info['metrics']}  (Authorization: Bearer $(cat {info['dir']}/token))")
    quorum = info["etcd_quorum"]
    for member in info["etcd"]:
        unhealthy = "running, unhealthy" if quorum["ok"] else "running, no leader"
        health = "healthy" if member["healthy"] else (unhealthy if member["running"] else "DOWN")
        click.echo(f"  {member['name']:<8} {member['url']:<28} {health}")
    if not quorum["ok"]:
        click.echo(
            f"  etcd has no quorum: {quorum['running']} of {quorum['members']} members run, "
            f"{quorum['majority']} needed; nothing is scheduled, started or stopped until a majority "
            "is back, and units already running keep running"
        )
    header = (
        f"  {'NODE':<8} {'IP':<13} {'MACHINE':<12} {'SYSTEMD':<8} {'FLEETD':<7} {'REGISTERED':<11} "
        f"{'PROCS':>5} {'RSS':>7} {'PSS':>7}  METADATA"
    )
    click.echo(header)
    for n in info["nodes"]:
        ip = n["ip"] + (" (cut)" if n["partitioned"] else "")
        metadata = ",".join(f"{k}={v}" for k, v in n["metadata"].items()) or "-"
        machine = n["machine_id"] if wide else short_machine_id(n["machine_id"])
        click.echo(
            f"  {n['name']:<8} {ip:<13} {machine:<12} {yes(n['systemd']):<8} {yes(n['fleetd']):<7} "
            f"{registered(n['registered']):<11} {n['processes']:>5} "
            f"{n['rss_kib'] // 1024:>5}MB {n['pss_kib'] // 1024:>5}MB  {metadata}"
        )
