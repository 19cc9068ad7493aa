"""`fleetpy registry`: maintenance of the registry in etcd (migrating between etcd's APIs)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from fleetpy.registry.connect import EtcdOptions, open_store
from fleetpy.registry.migrate import migrate
from fleetpy.registry.registry import DEFAULT_PREFIX, Registry
from fleetpy.registry.store import Credentials, StoreError


@click.group("registry")
def group() -> None:
    """The cluster registry in etcd."""


@group.command("migrate")
@click.option(
    "--from", "source", type=click.Choice(["v2", "v3"]), required=True, help="etcd API to copy from"
)
@click.option("--to", "target", type=click.Choice(["v2", "v3"]), required=True, help="etcd API to copy to")
@click.option(
    "--etcd-servers", default="http://127.0.0.1:2379", show_default=True, help="comma-separated URLs"
)
@click.option("--etcd-key-prefix", default=DEFAULT_PREFIX, show_default=True)
@click.option("--etcd-cafile")
@click.option("--etcd-certfile")
@click.option("--etcd-keyfile")
@click.option("--etcd-username")
@click.option("--etcd-password-file", type=click.Path(exists=True, dir_okay=False))
def migrate_command(
    source: str,
    target: str,
    etcd_servers: str,
    etcd_key_prefix: str,
    etcd_cafile: str | None,
    etcd_certfile: str | None,
    etcd_keyfile: str | None,
    etcd_username: str | None,
    etcd_password_file: str | None,
) -> None:
    """Copy a live cluster's registry from one etcd API to the other.

    Copies the durable records (version, unit/, job/, machine-metadata/, cordon/, schedule/,
    pending/, state/) under the same prefix, and only those the target lacks or holds
    differently, so it is safe to run twice.
    Machine records and the leader key are not copied: each fleetd writes its own when it starts
    on the target. See docs/registry.md for the rolling switch of a running cluster.
    """
    if source == target:
        raise click.UsageError("--from and --to name the same API; nothing to migrate")
    if bool(etcd_certfile) != bool(etcd_keyfile):
        raise click.UsageError("--etcd-certfile and --etcd-keyfile go together")
    password = Path(etcd_password_file).read_text().strip() if etcd_password_file else None
    credentials = Credentials(
        ca_cert=etcd_cafile,
        cert=(etcd_certfile, etcd_keyfile) if etcd_certfile else None,
        username=etcd_username,
        password=password,
    )
    options = EtcdOptions(
        tuple(u.strip() for u in etcd_servers.split(",") if u.strip()), credentials=credentials
    )

    async def run():
        old = Registry(open_store(options, source), etcd_key_prefix)
        new = Registry(open_store(options, target), etcd_key_prefix)
        try:
            return await migrate(old, new)
        finally:
            await old.close()
            await new.close()

    try:
        result = asyncio.run(run())
    except StoreError as error:
        raise click.ClickException(str(error)) from None
    click.echo(
        f"copied {result.copied} record(s) from etcd {source} to {target} under {etcd_key_prefix}; "
        f"{result.unchanged} already there"
    )
