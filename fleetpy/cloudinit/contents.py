"""The text of the files apply writes for coreos.etcd2 and coreos.fleet."""

from __future__ import annotations

from functools import cache
from typing import Any

import jinja2

from fleetpy.unit.quoting import environment

DROP_IN = "20-cloudinit.conf"
ETCD_UNIT = "etcd2.service"
FLEET_UNIT = "fleet.service"


def environment_drop_in(prefix: str, options: dict[str, Any]) -> bytes:
    """A [Service] drop-in with one Environment="PREFIX_OPTION=value" per option, as
    coreos-cloudinit wrote it. Specifiers stay: user-data writes `name: %H` for systemd."""
    lines = ["[Service]"]
    lines += [
        environment(f"{prefix}_{key.upper()}", _text(value), specifiers=True)
        for key, value in options.items()
    ]
    return ("\n".join(lines) + "\n").encode()


def fleet_conf(options: dict[str, Any]) -> bytes:
    """fleet.conf as fleetd reads it (fleetpy.fleetd.config): key=value, lists as ["a","b"]."""
    lines = ["# Written by fleetpy cloud-config apply from coreos.fleet"]
    for key, value in options.items():
        if key == "etcd_servers":
            urls = [u.strip() for u in str(value).split(",") if u.strip()]
            lines.append(f"{key}=[{','.join(_conf_quoted(u) for u in urls)}]")
        elif isinstance(value, bool | int | float):
            lines.append(f"{key}={_text(value)}")
        else:
            lines.append(f"{key}={_conf_quoted(str(value))}")
    return ("\n".join(lines) + "\n").encode()


def etcd_unit(bus: str, enable_v2: bool) -> bytes:
    """etcd2.service: Debian's etcd, configured by the drop-in from coreos.etcd2; its v2 API
    only with `enable_v2` (the machine's fleetd speaks it)."""
    wanted_by = "multi-user.target" if bus == "system" else "default.target"
    return (
        _etcd_template()
        .render(drop_in=f"{ETCD_UNIT}.d/{DROP_IN}", wanted_by=wanted_by, enable_v2=enable_v2)
        .encode()
    )


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _conf_quoted(text: str) -> str:
    # fleetd reads quoted values with shlex: only backslash and '"' need escaping.
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@cache
def _etcd_template() -> jinja2.Template:
    loader = jinja2.PackageLoader("fleetpy", "templates")
    env = jinja2.Environment(loader=loader, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.get_template("etcd2.service.j2")
