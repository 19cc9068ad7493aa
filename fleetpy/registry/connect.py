"""Reaching etcd: which API to speak (v2 or v3), over what security, in one place."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from fleetpy.registry.store import NO_CREDENTIALS, Credentials, Store, Unavailable

ETCD_APIS = ("auto", "v2", "v3")


@dataclass(frozen=True)
class EtcdOptions:
    servers: tuple[str, ...]
    api: str = "auto"
    credentials: Credentials = NO_CREDENTIALS
    request_timeout: float = 5.0
    retry_for: float = 10.0

    def __post_init__(self) -> None:
        if self.api not in ETCD_APIS:
            raise ValueError(f"bad etcd API {self.api!r}: use auto, v2 or v3")


def open_store(options: EtcdOptions, api: str) -> Store:
    """A store speaking `api` ("v2" or "v3") to the configured etcd."""
    servers = list(options.servers)
    if api == "v2":
        from fleetpy.registry.etcd2 import EtcdV2Store  # see the package docstring

        return EtcdV2Store(
            servers,
            retry_for=options.retry_for,
            request_timeout=options.request_timeout,
            credentials=options.credentials,
        )
    if api == "v3":
        from fleetpy.registry.etcd3 import EtcdV3Store  # see the package docstring

        return EtcdV3Store(
            servers,
            retry_for=options.retry_for,
            request_timeout=options.request_timeout,
            credentials=options.credentials,
        )
    raise ValueError(f"bad etcd API {api!r}: use v2 or v3")


async def choose_api(options: EtcdOptions, prefix: str) -> str:
    """`auto`: v3 when etcd offers it, unless the registry at `prefix` exists only in v2.

    A fleetpy cluster that has always run on v2 stays there until it is migrated
    (`fleetpy registry migrate`): otherwise a restarted fleetd would start an empty registry
    beside the live one.
    """
    if options.api != "auto":
        return options.api
    version_key = "/" + prefix.strip("/") + "/version"
    found: dict[str, bool] = {}
    for api in ("v3", "v2"):
        store = open_store(options, api)
        # Any failure (unreachable, API switched off, refused) means: not offered.
        with contextlib.suppress(Exception):
            found[api] = await store.get(version_key) is not None
        await store.close()
        if found.get("v3"):
            # A registry on v3 is used whatever v2 holds, so v2's client is not even imported:
            # it would stay in fleetd's memory for nothing (python-etcd and urllib3: 7 MB).
            break
    if found.get("v3") or ("v3" in found and not found.get("v2")):
        return "v3"
    if "v2" in found:
        return "v2"
    raise Unavailable(
        f"etcd at {', '.join(options.servers)} answers neither its v3 nor its v2 API; "
        "check that etcd runs and --etcd-servers points at it"
    )
