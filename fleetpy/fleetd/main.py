"""fleetd's entry point: read the configuration, then run agent, engine and API together."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import click

from fleetpy.api import SystemctlUnitInfo, create_app, serve
from fleetpy.api.peer import Peers, peer_tls
from fleetpy.fleetd.config import Config, ConfigError, build_config, machine_id
from fleetpy.fleetd.daemon import build_fleetd
from fleetpy.registry import Credentials, EtcdOptions, Registry, StoreError, choose_api, open_store
from fleetpy.registry.measured import MeasuredStore
from fleetpy.systemd import DbusManager, SystemdError

log = logging.getLogger("fleetd")

# v2 watches hold a thread each for as long as they long-poll; API calls need threads meanwhile.
REGISTRY_THREADS = 32

T = TypeVar("T")


def local_unit_info(bus: str) -> SystemctlUnitInfo:
    """systemctl/journalctl for the manager fleetd drives; a bus address is a user manager's bus
    (that is how one manager among several on a host is named), reached through the session bus."""
    if bus in ("user", "system"):
        return SystemctlUnitInfo(bus)
    # An empty XDG_RUNTIME_DIR keeps systemctl from trying fleetd's own user manager first.
    return SystemctlUnitInfo("user", {"DBUS_SESSION_BUS_ADDRESS": bus, "XDG_RUNTIME_DIR": ""})


def etcd_options(config: Config) -> EtcdOptions:
    password = Path(config.etcd_password_file).read_text().strip() if config.etcd_password_file else None
    credentials = Credentials(
        ca_cert=config.etcd_cafile or None,
        cert=(config.etcd_certfile, config.etcd_keyfile) if config.etcd_certfile else None,
        username=config.etcd_username or None,
        password=password,
    )
    return EtcdOptions(
        tuple(config.etcd_servers), config.etcd_api, credentials, request_timeout=config.etcd_request_timeout
    )


async def open_registry(config: Config) -> Registry:
    """The registry on the configured etcd; with `etcd_api=auto`, waits until etcd answers."""
    options = etcd_options(config)
    api = await _until_ready("etcd", lambda: choose_api(options, config.etcd_key_prefix))
    log.info("registry on etcd's %s API", api)
    return Registry(MeasuredStore(open_store(options, api)), config.etcd_key_prefix)


async def run(config: Config) -> None:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(REGISTRY_THREADS))
    registry = await open_registry(config)
    token = Path(config.api_token_file).read_text().strip() if config.api_token_file else None
    await _until_ready("etcd", registry.ensure_schema)
    systemd = await _until_ready("systemd", lambda: DbusManager.connect(config.systemd_bus, config.unit_dir))
    cluster_ca = config.api_tls_client_ca
    tls = peer_tls(cluster_ca, config.api_tls_cert, config.api_tls_key) if cluster_ca else None
    # The agent fetches a volume moving here from its machine's fleetd, as the API forwards.
    peers = Peers(registry, machine_id(config), token, tls)
    fleetd = build_fleetd(config, registry, systemd, volume_source=peers)
    app = create_app(
        registry,
        machine_id=fleetd.machine.id,
        local=local_unit_info(config.systemd_bus),
        peer_token=token,
        peer_tls=tls,
        cached=True,
        volume_dir=Path(config.volume_dir),
    )
    runner = await serve(
        app,
        socket_path=config.api_socket,
        listen=config.api_listen or None,
        token=token,
        tls_cert=config.api_tls_cert or None,
        tls_key=config.api_tls_key or None,
        client_ca=config.api_tls_client_ca or None,
        insecure=config.api_insecure,
    )
    log.info(
        "fleetd %s up: api %s%s, etcd %s",
        fleetd.machine.id,
        config.api_socket,
        f" and {config.api_listen}" if config.api_listen else "",
        ",".join(config.etcd_servers),
    )
    main = asyncio.ensure_future(fleetd.run())
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, main.cancel)
    try:
        await main
    except asyncio.CancelledError:
        log.info("fleetd stopping; units keep running")
        fleetd.agent.events.left(fleetd.machine.id)
    finally:
        await fleetd.recorder.close()
        await runner.cleanup()
        await systemd.close()
        await registry.close()


async def _until_ready(what: str, attempt: Callable[[], Awaitable[T]]) -> T:
    """Retry `attempt` until it succeeds: etcd or systemd being away is no reason to exit."""
    while True:
        try:
            return await attempt()
        except (StoreError, SystemdError, ConnectionError, FileNotFoundError) as error:
            log.warning("waiting for %s: %s", what, error)
            await asyncio.sleep(1)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", help="config file (default /etc/fleet/fleet.conf, or $FLEET_CONFIG)")
@click.option("--etcd-servers", help="comma-separated etcd client URLs")
@click.option("--etcd-key-prefix", help="key prefix of the registry in etcd (default /_fleetpy/)")
@click.option("--etcd-api", help="etcd API: auto (v3 when offered), v2 or v3")
@click.option("--etcd-cafile", help="CA certificate of etcd's TLS")
@click.option("--etcd-certfile", help="client certificate for etcd (with --etcd-keyfile)")
@click.option("--etcd-keyfile")
@click.option("--etcd-username", help="etcd user (with --etcd-password-file)")
@click.option("--etcd-password-file", help="file holding the etcd user's password")
@click.option("--public-ip", help="IP address other machines reach this one at")
@click.option("--metadata", help="machine metadata, e.g. role=web,zone=a")
@click.option(
    "--capacity", help="what units may reserve, e.g. cpus=2,memory=4G (default: read from the host)"
)
@click.option("--facts-dir", help="executables printing key=value facts (default /etc/fleetpy/facts.d)")
@click.option("--facts-interval", help="how often live facts are read, e.g. 10s (0: only at start)")
@click.option("--machine-id", help="machine id (default /etc/machine-id, else generated and kept)")
@click.option("--unit-dir", help="where unit files are written (default /run/fleetpy/units)")
@click.option("--volume-dir", help="where local volumes live (default /var/lib/fleetpy/volumes)")
@click.option(
    "--shared-volume-dir",
    help="where shared volumes (Volume=NAME:shared) live: storage every machine mounts (default: none)",
)
@click.option("--api-socket", help="unix socket of the API (default /var/run/fleet.sock)")
@click.option("--api-listen", help="also serve the API on HOST:PORT (needs a token or a client CA)")
@click.option("--api-token-file", help="file holding the bearer token for TCP clients and peers")
@click.option("--api-tls-cert")
@click.option("--api-tls-key")
@click.option(
    "--api-tls-client-ca", help="cluster CA: admits TCP clients with a certificate it signed, verifies peers"
)
@click.option(
    "--api-insecure",
    is_flag=True,
    default=None,
    flag_value="true",
    help="serve --api-listen with no token and no client CA: anyone who reaches it controls the cluster",
)
@click.option("--systemd-bus", help="system, user or a D-Bus address (default system)")
@click.option("--agent-ttl", help="machine heartbeat TTL, e.g. 10s")
@click.option("--engine-reconcile-interval", help="full scheduling pass interval, e.g. 30s")
@click.option(
    "--events-retention",
    help="how long the event history of a machine gone stays in etcd, e.g. 24h; 0: for ever",
)
@click.option("--disable-engine", is_flag=True, default=None, flag_value="true")
@click.option(
    "--fence",
    is_flag=True,
    default=None,
    flag_value="true",
    help="stop all units when the heartbeat cannot be renewed, before the TTL runs out",
)
@click.option("-v", "--verbosity", help="log verbosity: 0 info, 1 debug")
def main(config_file: str | None, **flags: str | None) -> None:
    """Run the fleetpy daemon: agent, engine and API of one machine."""
    try:
        config = build_config(flags, config_file=config_file)
    except ConfigError as error:
        raise click.UsageError(str(error)) from None
    logging.basicConfig(
        level=logging.DEBUG if config.verbosity else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        asyncio.run(run(config))
    except (OSError, ValueError) as error:
        raise click.ClickException(str(error)) from None


if __name__ == "__main__":
    main()
