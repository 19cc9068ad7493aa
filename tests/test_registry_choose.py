"""`--etcd-api auto` against a real etcd offering both APIs: which one fleetd speaks, and that a
registry found on v3 never loads the v2 client into fleetd (it would stay in memory for nothing)."""

from __future__ import annotations

import json
import subprocess
import sys

from fleetpy.registry import Registry
from fleetpy.registry.etcd2 import EtcdV2Store
from fleetpy.registry.etcd3 import EtcdV3Store

# choose_api in a fresh interpreter, so sys.modules shows what choosing imported.
CHOOSE = """
import asyncio, json, sys
from fleetpy.registry import EtcdOptions, choose_api
api = asyncio.run(choose_api(EtcdOptions((sys.argv[1],)), sys.argv[2]))
print(json.dumps({"api": api, "v2_client_loaded": "etcd" in sys.modules}))
"""


def choose(url: str, prefix: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHOOSE, url, prefix], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(done.stdout)


async def test_auto_picks_a_v3_registry_without_loading_the_v2_client(etcd_url, etcd_prefix) -> None:
    registry = Registry(EtcdV3Store([etcd_url]), etcd_prefix)
    await registry.ensure_schema()
    await registry.close()

    assert choose(etcd_url, etcd_prefix) == {"api": "v3", "v2_client_loaded": False}


async def test_auto_stays_on_v2_while_the_registry_exists_only_there(etcd_url, etcd_prefix) -> None:
    registry = Registry(EtcdV2Store([etcd_url]), etcd_prefix)
    await registry.ensure_schema()
    await registry.close()

    assert choose(etcd_url, etcd_prefix)["api"] == "v2"


def test_auto_starts_a_new_registry_on_v3(etcd_url, etcd_prefix) -> None:
    assert choose(etcd_url, etcd_prefix)["api"] == "v3"
