"""Shell completion of unit names and machine ids for fleetctl (click's completion, asked of fleetd).

Commands and options complete through click alone; these callbacks ask the API, with a short
timeout, and offer nothing rather than an error when fleetd cannot be reached.
"""

from __future__ import annotations

import os

import click
from click.shell_completion import CompletionItem

DEFAULT_ENDPOINT = "unix:///var/run/fleet.sock"
TIMEOUT = 2.0


def _names(ctx: click.Context, what: str) -> list[str]:
    from fleetpy.client import Client

    params = ctx.find_root().params
    endpoint = params.get("endpoint") or os.environ.get("FLEETCTL_ENDPOINT") or DEFAULT_ENDPOINT
    token = params.get("token") or os.environ.get("FLEETCTL_TOKEN")
    try:
        with Client(endpoint, token, timeout=TIMEOUT) as client:
            if what == "units":
                return [u["name"] for u in client.units()]
            return [m["id"] for m in client.machines()]
    except Exception:  # noqa: BLE001 - completion must never print a traceback into a shell
        return []


def unit_names(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    return [CompletionItem(n) for n in _names(ctx, "units") if n.startswith(incomplete)]


def machine_ids(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    return [CompletionItem(m) for m in _names(ctx, "machines") if m.startswith(incomplete)]
