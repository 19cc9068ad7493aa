"""The cloud-config keys we understand, their types and the rules for their values.

Key names are spelled with underscores here; user-data may use dashes instead
(``public-ip`` and ``public_ip`` are the same key), as coreos-cloudinit allows.
The key lists follow coreos-cloudinit's config package and fleetd's own flags.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import ipaddress
import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Literal

from fleetpy.cloudinit.substitute import substitute
from fleetpy.conf.values import (
    BadValue,
    parse_agent_ttl,
    parse_capacity,
    parse_duration,
    parse_metadata,
    parse_shared_volume_dir,
)
from fleetpy.registry import ETCD_APIS
from fleetpy.unit.errors import InvalidUnitName
from fleetpy.unit.name import validate_unit_name

Severity = Literal["error", "warning"]
Kind = Literal["str", "int", "float", "bool", "list", "map", "any"]
# What a value check reports: nothing if the value is fine.
Problem = tuple[Severity, str]
Check = Callable[[str], Problem | None]


@dataclass(frozen=True)
class Spec:
    """The expected shape of one node of the cloud-config tree."""

    kind: Kind
    fields: Mapping[str, Spec] = field(default_factory=dict)  # for "map": known keys
    item: Spec | None = None  # for "list": the spec every element must meet
    required: tuple[str, ...] = ()  # for "map": keys that must be present and non-empty
    check: Check | None = None  # for scalars: rule for the value's text
    deprecated: str | None = None  # why the key should no longer be used


def normalize_key(key: str) -> str:
    return key.replace("-", "_")


# A documentation address (RFC 5737) stands in for substitution variables so that
# "http://$private_ipv4:2379" is checked like the URL it will become.
_PLACEHOLDER_IP = "192.0.2.1"


def _substituted(value: str) -> str:
    return substitute(value, _PLACEHOLDER_IP, _PLACEHOLDER_IP)


def one_of(*choices: str) -> Check:
    def check(value: str) -> Problem | None:
        if value in choices:
            return None
        return "error", f'invalid value "{value}" (valid: {", ".join(choices)})'

    return check


_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s,]+")


def _url_list(value: str) -> Problem | None:
    for url in _substituted(value).split(","):
        if not _URL.fullmatch(url.strip()):
            return (
                "error",
                f'"{url.strip()}" is not a URL (expected e.g. http://10.0.0.1:2379)',
            )
    return None


def _url(value: str) -> Problem | None:
    if not _URL.fullmatch(_substituted(value)):
        return (
            "error",
            f'"{value}" is not a URL (expected e.g. https://discovery.etcd.io/TOKEN)',
        )
    return None


def _initial_cluster(value: str) -> Problem | None:
    for member in value.split(","):
        name, eq, url = member.strip().partition("=")
        if not name or not eq or not _URL.fullmatch(_substituted(url)):
            return "error", f'"{member.strip()}" is not a NAME=URL cluster member'
    return None


def _etcd_api(value: str) -> Problem | None:
    if value not in ETCD_APIS:
        return ("error", f'"{value}" is not an etcd API fleetd speaks (auto, v2 or v3)')
    return None


def _ip_address(value: str) -> Problem | None:
    try:
        ipaddress.ip_address(_substituted(value))
    except ValueError:
        return (
            "error",
            f'"{value}" is not an IP address (or $private_ipv4/$public_ipv4)',
        )
    return None


def _as_fleet_reads(parse: Callable[[str], object]) -> Check:
    """A check that finds in a value what fleet's own reader (fleetpy.conf.values) refuses,
    so the validator accepts exactly what fleetd will."""

    def check(value: str) -> Problem | None:
        try:
            parse(value)
        except BadValue as error:
            return "error", str(error)
        return None

    return check


_metadata = _as_fleet_reads(parse_metadata)
_capacity = _as_fleet_reads(parse_capacity)
_agent_ttl = _as_fleet_reads(parse_agent_ttl)
# locksmith reads its durations with Go, which wants a unit.
_go_duration = _as_fleet_reads(lambda value: parse_duration(value, bare_seconds=False))


_WINDOW_START = re.compile(
    r"((?i:sun|mon|tue|wed|thu|fri|sat) )?0*([0-9]|1[0-9]|2[0-3]):0*([0-9]|[1-5][0-9])"
)


def _window_start(value: str) -> Problem | None:
    if not _WINDOW_START.fullmatch(value):
        return (
            "error",
            f'"{value}" is not a reboot window start such as "Thu 04:00" or "04:00"',
        )
    return None


def _reboot_strategy(value: str) -> Problem | None:
    if value == "best-effort":
        # Removed from locksmith; still common in fleet-era user-data.
        return (
            "warning",
            'deprecated value "best-effort" (use etcd-lock, reboot or off)',
        )
    return one_of("etcd-lock", "reboot", "off")(value)


_HOST_LABEL = re.compile(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?")


def _hostname(value: str) -> Problem | None:
    name = _substituted(value)
    if len(name) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in name.split(".")):
        return "error", f'"{value}" is not a valid hostname'
    return None


_SSH_KEY_TYPE = re.compile(r"ssh-(rsa|dss|ed25519)|ecdsa-sha2-nistp(256|384|521)|sk-\S+@openssh\.com")


def _ssh_key(value: str) -> Problem | None:
    # authorized_keys lines may start with options, so look for "TYPE BASE64" anywhere.
    words = value.split()
    for kind, blob in pairwise(words):
        if _SSH_KEY_TYPE.fullmatch(kind) and re.fullmatch(r"[A-Za-z0-9+/]+=*", blob):
            return None
    return (
        "error",
        "does not look like an SSH public key (expected e.g. ssh-ed25519 AAAA...)",
    )


def _absolute_path(value: str) -> Problem | None:
    if not value.startswith("/"):
        return "error", f'"{value}" is not an absolute path'
    return None


# coreos-cloudinit's rule: three or four octal digits, optionally with a leading 0.
# The text is read as octal even when YAML typed it as an integer (0644 or 644).
_PERMISSIONS = re.compile(r"0?[0-7]{3,4}")


def _permissions(value: str) -> Problem | None:
    if not _PERMISSIONS.fullmatch(value):
        return (
            "error",
            f'invalid permissions "{value}" (expected an octal mode such as "0644")',
        )
    return None


ENCODINGS = (
    "b64",
    "base64",
    "gz",
    "gzip",
    "gz+b64",
    "gz+base64",
    "gzip+b64",
    "gzip+base64",
)


def decode_content(content: str, encoding: str | None) -> bytes:
    """Decode write_files content; raises ValueError if it is not in `encoding`."""
    if not encoding:
        return content.encode()
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}")
    data = content.encode()
    try:
        if "b64" in encoding or "base64" in encoding:
            # Block scalars wrap long base64 text; the line breaks are not part of it.
            data = base64.b64decode("".join(content.split()), validate=True)
        if encoding.startswith("gz"):
            data = gzip.decompress(data)
    except (binascii.Error, OSError, EOFError, zlib.error) as err:
        raise ValueError(str(err) or type(err).__name__) from err
    return data


def _unit_name(value: str) -> Problem | None:
    try:
        validate_unit_name(value)
    except InvalidUnitName as err:
        return "error", f"invalid unit name {err}"
    return None


def _drop_in_name(value: str) -> Problem | None:
    if not value.endswith(".conf"):
        # systemd only reads *.conf files from a .d directory; anything else is ignored.
        return (
            "warning",
            f'drop-in "{value}" does not end in .conf, so systemd will ignore it',
        )
    return None


STR = Spec("str")
INT = Spec("int")
FLOAT = Spec("float")
BOOL = Spec("bool")
ANY = Spec("any")
STR_LIST = Spec("list", item=STR)


def _strings(*names: str) -> dict[str, Spec]:
    return {name: STR for name in names}


ETCD2 = Spec(
    "map",
    fields={
        **_strings(
            "cert_file",
            "cors",
            "data_dir",
            "discovery_fallback",
            "discovery_srv",
            "discovery_proxy",
            "key_file",
            "log_package_levels",
            "name",
            "peer_cert_file",
            "peer_key_file",
            "peer_trusted_ca_file",
            "trusted_ca_file",
            "wal_dir",
        ),
        **{
            name: Spec("str", check=_url_list)
            for name in (
                "advertise_client_urls",
                "initial_advertise_peer_urls",
                "listen_client_urls",
                "listen_peer_urls",
            )
        },
        **{
            name: INT
            for name in (
                "election_timeout",
                "heartbeat_interval",
                "max_snapshots",
                "max_wals",
                "proxy_dial_timeout",
                "proxy_failure_wait",
                "proxy_read_timeout",
                "proxy_refresh_interval",
                "proxy_write_timeout",
                "snapshot_count",
            )
        },
        **{
            name: BOOL
            for name in (
                "client_cert_auth",
                "debug",
                "enable_pprof",
                "force_new_cluster",
                "peer_client_cert_auth",
                "strict_reconfig_check",
            )
        },
        "ca_file": Spec("str", deprecated="use trusted_ca_file and client_cert_auth"),
        "peer_ca_file": Spec("str", deprecated="use peer_trusted_ca_file and peer_client_cert_auth"),
        "discovery": Spec("str", check=_url),
        "initial_cluster": Spec("str", check=_initial_cluster),
        "initial_cluster_state": Spec("str", check=one_of("new", "existing")),
        "initial_cluster_token": STR,
        "proxy": Spec("str", check=one_of("on", "off", "readonly")),
    },
)

FLEET = Spec(
    "map",
    fields={
        "agent_ttl": Spec("str", check=_agent_ttl),
        "authorized_keys_file": Spec("str", deprecated="fleetd ignores it"),
        "disable_engine": BOOL,
        "disable_watches": BOOL,
        "engine_reconcile_interval": FLOAT,
        **_strings("etcd_cafile", "etcd_certfile", "etcd_keyfile", "etcd_key_prefix"),
        **_strings("etcd_username", "etcd_password"),
        "etcd_api": Spec("str", check=_etcd_api),
        "etcd_request_timeout": FLOAT,
        "etcd_servers": Spec("str", check=_url_list),
        "metadata": Spec("str", check=_metadata),
        # fleetpy's own (docs/resources.md): what units may reserve, and the facts directory.
        "capacity": Spec("str", check=_capacity),
        "facts_dir": STR,
        # and where shared volumes live (docs/resources.md): storage every machine mounts.
        "shared_volume_dir": Spec("str", check=_as_fleet_reads(parse_shared_volume_dir)),
        "facts_interval": Spec("str", check=_as_fleet_reads(parse_duration)),
        "public_ip": Spec("str", check=_ip_address),
        "token_limit": INT,
        "verbosity": INT,
        "verify_units": Spec("bool", deprecated="fleetd ignores it"),
    },
)

UNIT_COMMANDS = (
    "start",
    "stop",
    "restart",
    "reload",
    "try-restart",
    "reload-or-restart",
    "reload-or-try-restart",
)

DROP_IN = Spec(
    "map",
    fields={"name": Spec("str", check=_drop_in_name), "content": STR},
    required=("name",),
)

UNIT = Spec(
    "map",
    fields={
        "name": Spec("str", check=_unit_name),
        "content": STR,
        "command": Spec("str", check=one_of(*UNIT_COMMANDS)),
        "enable": BOOL,
        "runtime": BOOL,
        "mask": BOOL,
        "drop_ins": Spec("list", item=DROP_IN),
    },
    required=("name",),
)

COREOS = Spec(
    "map",
    fields={
        "etcd": Spec(
            "any",
            deprecated="etcd v1 is no longer supported; configure etcd through coreos.etcd2",
        ),
        "etcd2": ETCD2,
        "fleet": FLEET,
        "flannel": Spec(
            "map",
            fields=_strings(
                "etcd_endpoints",
                "etcd_cafile",
                "etcd_certfile",
                "etcd_keyfile",
                "etcd_prefix",
                "etcd_username",
                "etcd_password",
                "ip_masq",
                "subnet_file",
                "interface",
                "public_ip",
            ),
        ),
        "locksmith": Spec(
            "map",
            fields={
                **_strings(
                    "endpoint",
                    "etcd_cafile",
                    "etcd_certfile",
                    "etcd_keyfile",
                    "etcd_username",
                    "etcd_password",
                    "group",
                ),
                "window_start": Spec("str", check=_window_start),
                "window_length": Spec("str", check=_go_duration),
            },
        ),
        "oem": Spec(
            "map",
            fields=_strings("id", "name", "version_id", "home_url", "bug_report_url"),
        ),
        "update": Spec(
            "map",
            fields={
                "reboot_strategy": Spec("str", check=_reboot_strategy),
                "group": STR,
                "server": STR,
            },
        ),
        "units": Spec("list", item=UNIT),
    },
)

_IMPORT_DEPRECATED = "fetching keys from a remote endpoint at boot is unreliable; list them"

USER = Spec(
    "map",
    fields={
        "name": STR,
        "passwd": STR,
        "ssh_authorized_keys": Spec("list", item=Spec("str", check=_ssh_key)),
        "coreos_ssh_import_github": Spec("str", deprecated=_IMPORT_DEPRECATED),
        "coreos_ssh_import_github_users": Spec("list", item=STR, deprecated=_IMPORT_DEPRECATED),
        "coreos_ssh_import_url": Spec("str", deprecated=_IMPORT_DEPRECATED),
        "gecos": STR,
        "homedir": Spec("str", check=_absolute_path),
        "no_create_home": BOOL,
        "primary_group": STR,
        "groups": STR_LIST,
        "no_user_group": BOOL,
        "system": BOOL,
        "no_log_init": BOOL,
        "shell": STR,
    },
    required=("name",),
)

WRITE_FILE = Spec(
    "map",
    fields={
        "path": Spec("str", check=_absolute_path),
        "content": STR,
        "permissions": Spec("str", check=_permissions),
        "owner": STR,
        "encoding": Spec("str", check=one_of(*ENCODINGS)),
    },
    required=("path",),
)

ROOT = Spec(
    "map",
    fields={
        "hostname": Spec("str", check=_hostname),
        "ssh_authorized_keys": Spec("list", item=Spec("str", check=_ssh_key)),
        "write_files": Spec("list", item=WRITE_FILE),
        "users": Spec("list", item=USER),
        "manage_etc_hosts": Spec("str", check=one_of("localhost")),
        "coreos": COREOS,
        # Keys for the real cloud-init, which often reads the same user-data; we
        # ignore them but must not call them unknown.
        "runcmd": Spec("list", item=ANY),
        "bootcmd": Spec("list", item=ANY),
        "packages": Spec("list", item=ANY),
    },
)
