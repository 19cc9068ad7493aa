"""fleetd's configuration, as fleet reads it: flags over FLEET_* variables over a config file."""

from __future__ import annotations

import os
import shlex
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from fleetpy.conf.values import (
    parse_agent_ttl,
    parse_capacity,
    parse_duration,
    parse_metadata,
    parse_shared_volume_dir,
)

DEFAULT_CONFIG_FILE = "/etc/fleet/fleet.conf"
SYSTEM_MACHINE_ID = "/etc/machine-id"


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Config:
    etcd_servers: tuple[str, ...] = ("http://127.0.0.1:2379",)
    etcd_key_prefix: str = "/_fleetpy/"
    etcd_cafile: str = ""
    etcd_certfile: str = ""
    etcd_keyfile: str = ""
    etcd_username: str = ""
    etcd_password_file: str = ""
    etcd_api: str = "auto"
    etcd_request_timeout: float = 5.0
    public_ip: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    # What units may reserve here (cpus, memory, disk); what is not given is read from the host.
    capacity: dict[str, float] = field(default_factory=dict)
    # Executables printing key=value facts (Facter's external facts), and how often live facts
    # are read again (0: only at start).
    facts_dir: str = "/etc/fleetpy/facts.d"
    facts_interval: float = 10.0
    machine_id: str = ""
    machine_id_file: str = "/var/lib/fleetpy/machine-id"
    unit_dir: str = "/run/fleetpy/units"
    # Local volumes ([X-Fleet] Volume=): kept on disk, so not under /run.
    volume_dir: str = "/var/lib/fleetpy/volumes"
    # Shared volumes ([X-Fleet] Volume=NAME:shared): a directory on storage every machine
    # mounts (NFS, say); empty: this machine runs no unit with a shared volume.
    shared_volume_dir: str = ""
    api_socket: str = "/var/run/fleet.sock"
    api_listen: str = ""
    api_token_file: str = ""
    api_tls_cert: str = ""
    api_tls_key: str = ""
    # The cluster CA: TCP clients with a certificate it signed are let in (mTLS), and peers
    # get the API token only once their certificate verifies against it.
    api_tls_client_ca: str = ""
    # Serve TCP with neither token nor client CA (anyone who reaches it controls the cluster).
    api_insecure: bool = False
    systemd_bus: str = "system"
    agent_ttl: float = 10.0
    # Stop every unit when the heartbeat cannot be renewed, before the TTL runs out (as
    # [X-Fleet] Fence=true does for one unit).
    fence: bool = False
    engine_reconcile_interval: float = 30.0
    # How long the leader keeps the event history of a machine that is gone (0: for ever).
    events_retention: float = 24 * 3600.0
    disable_engine: bool = False
    verbosity: int = 0


def _list(value: str) -> tuple[str, ...]:
    # fleet.conf writes lists as ["a","b"]; flags and env as a,b.
    text = value.strip().strip("[]")
    return tuple(item.strip().strip('"') for item in text.split(",") if item.strip().strip('"'))


def _bool(value: str) -> bool:
    text = value.strip().strip('"').lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"bad boolean {value!r}: use true or false")


_CONVERT = {
    "etcd_servers": _list,
    "metadata": parse_metadata,
    "capacity": parse_capacity,
    "shared_volume_dir": parse_shared_volume_dir,
    "facts_interval": parse_duration,
    "agent_ttl": parse_agent_ttl,
    "engine_reconcile_interval": parse_duration,
    "events_retention": parse_duration,
    "etcd_request_timeout": parse_duration,
    "disable_engine": _bool,
    "fence": _bool,
    "api_insecure": _bool,
    "verbosity": int,
}
KNOWN = {f.name for f in fields(Config)}


def read_config_file(path: str) -> dict[str, str]:
    """key=value lines as in fleet.conf; '#' comments; values may be quoted."""
    values = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ConfigError(f"{path}:{number}: expected key=value, got {line!r}")
        if key not in KNOWN:
            raise ConfigError(f"{path}:{number}: unknown option {key!r}; known: {', '.join(sorted(KNOWN))}")
        stripped = value.strip()
        values[key] = shlex.split(stripped)[0] if stripped.startswith(('"', "'")) else stripped
    return values


def from_environment(environ: Mapping[str, str]) -> dict[str, str]:
    return {
        name[6:].lower(): value
        for name, value in environ.items()
        if name.startswith("FLEET_") and name[6:].lower() in KNOWN
    }


def build_config(
    flags: Mapping[str, str | None], environ: Mapping[str, str] = os.environ, config_file: str | None = None
) -> Config:
    """Merge the three sources; flags win, then FLEET_* variables, then the file."""
    path = config_file or environ.get("FLEET_CONFIG") or DEFAULT_CONFIG_FILE
    raw: dict[str, str] = {}
    if config_file or os.path.exists(path):
        try:
            raw.update(read_config_file(path))
        except OSError as error:
            raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    raw.update(from_environment(environ))
    raw.update({k: v for k, v in flags.items() if v is not None})
    values = {}
    for key, value in raw.items():
        convert = _CONVERT.get(key)
        try:
            values[key] = convert(value) if convert else value
        except ValueError as error:
            raise ConfigError(f"{key}: {error}") from None
    config = Config(**values)
    _check_api_serving(config)
    if config.etcd_api not in ("auto", "v2", "v3"):
        raise ConfigError(f"etcd_api: bad value {config.etcd_api!r}: use auto, v2 or v3")
    if bool(config.etcd_certfile) != bool(config.etcd_keyfile):
        raise ConfigError("etcd_certfile and etcd_keyfile go together: give both or neither")
    if config.etcd_password_file and not config.etcd_username:
        raise ConfigError("etcd_password_file needs etcd_username")
    return config


def _check_api_serving(config: Config) -> None:
    """Refuse at start what `serve` would refuse, before fleetd waits for etcd."""
    if bool(config.api_tls_cert) != bool(config.api_tls_key):
        raise ConfigError("api_tls_cert and api_tls_key go together")
    if config.api_tls_client_ca and not config.api_tls_cert:
        raise ConfigError("api_tls_client_ca needs TLS: give api_tls_cert and api_tls_key too")
    if config.api_listen and not (config.api_token_file or config.api_tls_client_ca or config.api_insecure):
        raise ConfigError(
            f"api_listen {config.api_listen} needs authentication: give api_token_file or "
            "api_tls_client_ca (mTLS), or api_insecure=true to serve anyone who can reach it"
        )


def machine_id(config: Config) -> str:
    """The configured id, else /etc/machine-id, else one generated once and kept."""
    if config.machine_id:
        return config.machine_id
    for path in (SYSTEM_MACHINE_ID, config.machine_id_file):
        try:
            found = Path(path).read_text().strip()
        except OSError:
            continue
        if found:
            return found
    generated = uuid.uuid4().hex
    Path(config.machine_id_file).parent.mkdir(parents=True, exist_ok=True)
    Path(config.machine_id_file).write_text(generated + "\n")
    return generated
